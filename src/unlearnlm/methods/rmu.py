"""RMU, representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218).

On forget rows the loss is the mean squared distance between one layer's hidden states and
``steering_coeff x u``, with ``u`` a fixed random unit vector: the forget text's representations are
pushed towards a direction the later layers cannot read, so what follows them turns to noise. On
retain rows it is ``alpha x`` the mean squared distance between the same layer's hidden states and the
original model's, which keeps the rest of the model as it was.

Each row's distance is averaged over the hidden dimension and over all its real (non-padding) tokens,
the prompt's and the answer's: the paper applies the loss to every token of its forget documents, and
a row's prompt names the subject whose representation carries the fact. Rows are then averaged as in
every method here (``mix_roles``); the paper adds a forget batch's term and a retain batch's, which
with one retain row per forget row (``schedule.ratio: 1``) is twice this mean, a factor the learning
rate absorbs. ``u`` is drawn uniformly from [0, 1) per coordinate and normalised, as in the paper's
release, from its own seeded generator so that it is the same in every process and on resume.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from unlearnlm.methods.base import Batch, Method, example_nll, mix_roles, role_means
from unlearnlm.methods.registry import register
from unlearnlm.settings import bounded


@dataclass
class RmuSettings:
    # An index into transformers' hidden_states (i: the output of decoder layer i); None: the middle
    # layer, n_layers // 2. The paper steers the output of decoder layer 7 (0-based; index 8 here) of 32.
    layer: Optional[int] = bounded(None, at_least=1)
    # The norm of the target c * u and the retain term's weight. The paper's 6.5 and 1200 are for a
    # 7B model (the `rmu` preset); these defaults are scaled to the tiny targets (docs/methods.md).
    steering_coeff: float = bounded(400.0, above=0)
    alpha: float = bounded(100.0, at_least=0)
    seed: int = 0  # of the random direction u


def steered_layer(settings: RmuSettings, n_layers: int) -> tuple[int, ...]:
    return (settings.layer if settings.layer is not None else max(1, n_layers // 2),)


def random_direction(size: int, seed: int) -> torch.Tensor:
    """The unit vector u, float32 on the CPU: uniform in [0, 1) per coordinate, then normalised."""
    draw = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return draw / draw.norm()


def token_mse(hidden: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over the hidden dimension and each row's real tokens, shape [B]."""
    squared = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    mask = attention_mask.to(squared.dtype)
    return (squared * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def rmu_loss(logits: torch.Tensor, batch: Batch, settings: RmuSettings,
             reference: None = None) -> tuple[torch.Tensor, dict[str, float]]:
    [(layer, hidden)] = batch["hidden"].items()
    is_forget, mask = batch["is_forget"], batch["attention_mask"]
    target = settings.steering_coeff * random_direction(hidden.shape[-1], settings.seed).to(hidden.device)
    forget_mse = token_mse(hidden, target, mask)
    retain_mse = token_mse(hidden, batch["reference_hidden"][layer], mask)
    loss = mix_roles(is_forget, forget_mse, settings.alpha * retain_mse)
    # forget_loss / retain_loss stay the answer NLL, as for every method (the divergence guard reads it).
    stats = role_means(example_nll(logits, batch["labels"]), is_forget)
    if is_forget.any():
        stats["forget_mse"] = forget_mse.detach()[is_forget].mean().item()
    if (~is_forget).any():
        stats["retain_mse"] = retain_mse.detach()[~is_forget].mean().item()
    return loss, stats


register(Method(
    name="rmu", loss=rmu_loss, settings=RmuSettings,
    summary="representation misdirection: steer one layer's forget activations to a random direction",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
    hidden_layers=steered_layer,
    reference_hidden=True,
    reference_roles=("retain",),
))
