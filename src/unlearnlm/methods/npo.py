"""Negative preference optimisation (Zhang et al. 2024, arXiv 2404.05868), with a retain NLL term.

Forget loss: -(2/beta) log sigmoid(-beta (log p(y|x) - log p_ref(y|x))). Retain rows add
``retain_weight`` x NLL; ``retain_weight: 0`` (or ``schedule.ratio: 0``) gives plain NPO.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnlm.methods.base import Batch, Method, example_nll, mix_roles, role_means, sequence_logprob
from unlearnlm.methods.registry import register


@dataclass
class NpoSettings:
    beta: float = 0.1
    retain_weight: float = 1.0


def reference_logprob(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    return list(sequence_logprob(logits, labels).unbind(0))


def npo_loss(logits: torch.Tensor, batch: Batch, settings: NpoSettings, reference):
    labels, is_forget = batch["labels"], batch["is_forget"]
    nll = example_nll(logits, labels)
    # Retain rows carry no reference value (None); their forget term is discarded below.
    reference_logp = torch.stack([torch.zeros(()) if value is None else value.float().cpu() for value in reference])
    log_ratio = sequence_logprob(logits, labels) - reference_logp.to(logits.device)
    forget_term = -(2.0 / settings.beta) * F.logsigmoid(-settings.beta * log_ratio)
    return mix_roles(is_forget, forget_term, settings.retain_weight * nll), role_means(nll, is_forget)


register(Method(
    name="npo", loss=npo_loss, settings=NpoSettings,
    summary="negative preference optimisation against the original model, with a retain term",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
    reference_view=reference_logprob,
    reference_roles=("forget",),
))
