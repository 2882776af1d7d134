"""Gradient ascent: maximise the loss on the forget rows (the organizers' simplest baseline)."""

from dataclasses import dataclass

import torch

from unlearnlm.methods.base import Batch, Method, example_nll, role_means
from unlearnlm.methods.registry import register


@dataclass
class GaSettings:
    pass


def gradient_ascent_loss(logits: torch.Tensor, batch: Batch, settings: GaSettings, reference=None):
    nll = example_nll(logits, batch["labels"])
    is_forget = batch["is_forget"]
    # Retain rows (if a schedule adds any) carry no gradient in plain ascent.
    loss = -(nll * is_forget).sum() / is_forget.sum().clamp(min=1)
    return loss, role_means(nll, is_forget)


register(Method(
    name="ga", loss=gradient_ascent_loss, settings=GaSettings,
    summary="gradient ascent on the forget set",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 0, "epochs_per_chunk": 5}},
))
