"""Gradient difference: ascent on forget rows, descent on retain rows, in one weighted mean."""

from dataclasses import dataclass
from typing import Optional

import torch

from unlearnlm.methods.base import Batch, Method, example_nll, mix_roles, role_means
from unlearnlm.methods.registry import register
from unlearnlm.settings import bounded


@dataclass
class GdSettings:
    retain_weight: float = 1.0
    # The level (mean nats per answer token) up to which a forget row is pushed; None: no limit.
    forget_ceiling: Optional[float] = bounded(None, above=0)
    # Two-sided: a forget row below this level is pushed up, one above it pulled back down.
    forget_target: Optional[float] = bounded(None, above=0)


def gradient_difference_loss(logits: torch.Tensor, batch: Batch, settings, reference=None):
    """Mean over the batch of -1 x forget NLL and ``retain_weight`` x retain NLL (docs/methods.md).

    With ``forget_ceiling`` a forget row's NLL is clamped there, so its gradient stops once it reaches
    it: unseen text costs a model a finite loss, and a member pushed beyond it stands out to a
    membership attack as much as one left below it. With ``forget_target`` the forget term is
    ``|NLL - target|`` instead: rows past the level are pulled back to it.
    """
    nll = example_nll(logits, batch["labels"])
    is_forget = batch["is_forget"]
    if settings.forget_target is not None:
        forget_term = (nll - settings.forget_target).abs()
    else:
        forget_term = -(nll if settings.forget_ceiling is None else nll.clamp(max=settings.forget_ceiling))
    return mix_roles(is_forget, forget_term, settings.retain_weight * nll), role_means(nll, is_forget)


register(Method(
    name="gd", loss=gradient_difference_loss, settings=GdSettings,
    summary="gradient difference over the whole forget set (no chunking)",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
))
