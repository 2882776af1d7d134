"""AGAD, the SemEval winners' second method: alternating gradient ascent and descent.

The phases, in the order of the authors' ``methods/alternating.py`` (iraklis07/llm-unlearning;
Premptis et al., arXiv 2503.02443):

1. for each full forget chunk: a forgetting phase (gradient ascent on the chunk), then, every
   ``anneal_every`` chunks, an annealing phase (gradient descent on a random ``anneal_fraction`` of the
   retain set, truncated to a whole number of rows);
2. the remainder chunk, if any: a forgetting phase only, never followed by an intermediate anneal;
3. with ``final_anneal``: an annealing phase over the whole retain set.

Both kinds of phase use the plain token-mean cross-entropy of the batch (negated for forgetting) and
shuffle their rows every epoch, as a default ``transformers.Trainer`` does. The annealing phases
have their own learning rate, batch size and epochs. The retain subset is drawn with a generator
seeded by the run seed at every draw: the authors draw it right after a new ``Trainer`` re-seeded
Python's global generator with the same seed, so every intermediate anneal sees the same rows.
The optimizer state and the learning-rate schedule restart with every phase (``optim.optimizer_reset:
per_chunk``), as a new trainer per phase does.
"""

import random
from dataclasses import dataclass
from typing import Optional

import torch

from unlearnlm.data.schedule import FORGET, RETAIN, Item, Phase, split_chunks
from unlearnlm.errors import UserError
from unlearnlm.methods.base import Batch, Method, role_means, token_logprobs
from unlearnlm.methods.registry import register
from unlearnlm.settings import bounded


@dataclass
class AgadSettings:
    # The authors' ``interleaving_factor`` f anneals every 1/f chunks; 0 means no intermediate anneal.
    anneal_every: int = bounded(1, at_least=0)
    # At most 1 as well, checked where the subset is drawn.
    anneal_fraction: float = bounded(0.25, above=0)
    anneal_epochs: int = bounded(3, at_least=1)
    # None: the run's optim.lr / optim.batch_size.
    anneal_lr: Optional[float] = bounded(None, above=0)
    anneal_batch_size: Optional[int] = bounded(None, at_least=1)
    final_anneal: bool = True


def anneal_size(n_retain: int, fraction: float) -> int:
    """Rows per intermediate anneal: the fraction of the retain set, truncated as the authors do."""
    if fraction > 1:
        raise UserError(f"setting 'method_args.anneal_fraction': must be at most 1, got {fraction!r}")
    return int(n_retain * fraction)


def agad_schedule(n_forget: int, n_retain: int, config, settings: AgadSettings, seed: int) -> list[Phase]:
    chunk_size = config.schedule.chunk_size
    chunks = split_chunks(n_forget, chunk_size)
    n_full = n_forget // chunk_size if chunk_size else len(chunks)
    forget = dict(epochs=config.schedule.epochs_per_chunk, shuffle=True)
    anneal = dict(epochs=settings.anneal_epochs, lr=settings.anneal_lr, batch_size=settings.anneal_batch_size, shuffle=True)
    subset = anneal_size(n_retain, settings.anneal_fraction)
    phases: list[Phase] = []
    for number, rows in enumerate(chunks):
        phases.append(Phase(f"forget chunk {number + 1}", number, [Item(FORGET, i) for i in rows], **forget))
        full_chunk = number < n_full
        if full_chunk and subset and settings.anneal_every and (number + 1) % settings.anneal_every == 0:
            if settings.anneal_fraction == 1:
                drawn = list(range(n_retain))
            else:
                drawn = random.Random(seed).sample(range(n_retain), subset)
            phases.append(Phase(f"anneal after chunk {number + 1}", number, [Item(RETAIN, i) for i in drawn], **anneal))
    if settings.final_anneal and n_retain:
        last_chunk = phases[-1].chunk if phases else 0
        phases.append(Phase("final anneal", last_chunk, [Item(RETAIN, i) for i in range(n_retain)], **anneal))
    return phases


def token_mean_loss(logits: torch.Tensor, batch: Batch, settings: AgadSettings, reference=None):
    """The batch's cross-entropy averaged over all its answer tokens, the sign flipped on forget rows.

    An AGAD phase holds one role, so this is the library loss of a forgetting (negated) or an
    annealing phase; longer answers weigh more than in the per-example mean of SUGD. Under data
    parallelism each process's token mean is weighted by its share of rows, which is the global token
    mean when the shares hold equally many answer tokens.
    """
    logp, mask = token_logprobs(logits, batch["labels"])
    sign = torch.where(batch["is_forget"], -1.0, 1.0).to(logp.device)
    loss = (sign[:, None] * -logp).sum() / mask.sum().clamp(min=1)
    per_example = -logp.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return loss, role_means(per_example, batch["is_forget"])


register(Method(
    name="agad", loss=token_mean_loss, settings=AgadSettings,
    summary="alternating gradient ascent on forget chunks and descent on retain samples",
    config_defaults={"schedule": {"chunk_size": 64, "ratio": 0, "epochs_per_chunk": 3}},
    schedule=agad_schedule,
))
