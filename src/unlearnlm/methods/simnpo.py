"""SimNPO (Fan et al. 2024, arXiv 2410.07163): NPO without a reference model, length-normalised.

Forget loss: -(2/beta) log sigmoid(-(beta/|y|) log p(y|x) - gamma); retain rows add
``retain_weight`` x NLL. ``gamma`` is the margin inside the sigmoid. The SimNPO authors' code (and
open-unlearning's) takes a margin ``delta`` on the length-normalised log-likelihood instead, inside the
product with beta: sigmoid(-beta (log p(y|x)/|y| + delta)), so their delta is this gamma over beta. Give
``delta`` to copy their value; ``gamma = beta x delta`` is then used.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from unlearnlm.errors import UserError
from unlearnlm.methods.base import Batch, Method, example_nll, mix_roles, role_means
from unlearnlm.methods.registry import register


@dataclass
class SimnpoSettings:
    beta: float = 2.5
    gamma: float = 0.0
    delta: Optional[float] = None  # the authors' margin; gamma = beta x delta
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.delta is not None and self.gamma != 0.0:
            raise UserError("settings 'method_args.gamma' and 'method_args.delta' are exclusive (gamma = beta x delta)")

    @property
    def margin(self) -> float:
        """gamma, the margin inside the sigmoid."""
        return self.gamma if self.delta is None else self.beta * self.delta


def simnpo_loss(logits: torch.Tensor, batch: Batch, settings: SimnpoSettings, reference=None):
    nll = example_nll(logits, batch["labels"])
    is_forget = batch["is_forget"]
    # example_nll is already -(1/|y|) log p(y|x), the length-normalised log-likelihood, negated.
    forget_term = -(2.0 / settings.beta) * F.logsigmoid(settings.beta * nll - settings.margin)
    return mix_roles(is_forget, forget_term, settings.retain_weight * nll), role_means(nll, is_forget)


register(Method(
    name="simnpo", loss=simnpo_loss, settings=SimnpoSettings,
    summary="reference-free, length-normalised NPO, with a retain term",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
))
