"""SimNPO (Fan et al. 2024, arXiv 2410.07163): NPO without a reference model, length-normalised.

Forget loss: -(2/beta) log sigmoid(-(beta/|y|) log p(y|x) - gamma); retain rows add
``retain_weight`` x NLL.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnlm.methods.base import Batch, Method, example_nll, mix_roles, role_means
from unlearnlm.methods.registry import register


@dataclass
class SimnpoSettings:
    beta: float = 2.5
    gamma: float = 0.0
    retain_weight: float = 1.0


def simnpo_loss(logits: torch.Tensor, batch: Batch, settings: SimnpoSettings, reference=None):
    nll = example_nll(logits, batch["labels"])
    is_forget = batch["is_forget"]
    # example_nll is already -(1/|y|) log p(y|x), the length-normalised log-likelihood, negated.
    forget_term = -(2.0 / settings.beta) * F.logsigmoid(settings.beta * nll - settings.gamma)
    return mix_roles(is_forget, forget_term, settings.retain_weight * nll), role_means(nll, is_forget)


register(Method(
    name="simnpo", loss=simnpo_loss, settings=SimnpoSettings,
    summary="reference-free, length-normalised NPO, with a retain term",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
))
