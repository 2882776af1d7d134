"""Gradient difference: ascent on forget rows, descent on retain rows, in one weighted mean."""

from dataclasses import dataclass

import torch

from unlearnlm.methods.base import Batch, Method, example_nll, mix_roles, role_means
from unlearnlm.methods.registry import register


@dataclass
class GdSettings:
    retain_weight: float = 1.0


def gradient_difference_loss(logits: torch.Tensor, batch: Batch, settings, reference=None):
    """Mean over the batch of -1 x forget NLL and ``retain_weight`` x retain NLL (docs/methods.md)."""
    nll = example_nll(logits, batch["labels"])
    is_forget = batch["is_forget"]
    return mix_roles(is_forget, -nll, settings.retain_weight * nll), role_means(nll, is_forget)


register(Method(
    name="gd", loss=gradient_difference_loss, settings=GdSettings,
    summary="gradient difference over the whole forget set (no chunking)",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
))
