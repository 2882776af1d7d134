"""KL minimisation: ascent on forget rows, KL to the original model on retain answers."""

from dataclasses import dataclass

import torch

from unlearnlm.methods.base import Batch, Method, answer_log_distributions, example_nll, mix_roles, role_means
from unlearnlm.methods.registry import register


@dataclass
class KlSettings:
    retain_weight: float = 1.0


def retain_kl(logits: torch.Tensor, labels: torch.Tensor, reference: list[torch.Tensor]) -> torch.Tensor:
    """KL(reference || model) averaged over each example's answer tokens only, shape [B]."""
    current = answer_log_distributions(logits, labels)
    values = []
    for model_logp, ref_logp in zip(current, reference):
        if ref_logp is None or model_logp.shape[0] == 0:  # a forget row, or no answer tokens
            values.append(model_logp.sum())
            continue
        ref_logp = ref_logp.to(model_logp.device, model_logp.dtype)
        values.append((ref_logp.exp() * (ref_logp - model_logp)).sum(dim=-1).mean())
    return torch.stack(values)


def kl_loss(logits: torch.Tensor, batch: Batch, settings: KlSettings, reference):
    nll = example_nll(logits, batch["labels"])
    is_forget = batch["is_forget"]
    divergence = retain_kl(logits, batch["labels"], reference)
    loss = mix_roles(is_forget, -nll, settings.retain_weight * divergence)
    stats = role_means(nll, is_forget)
    if (~is_forget).any():
        stats["retain_kl"] = divergence.detach()[~is_forget].mean().item()
    return loss, stats


register(Method(
    name="kl", loss=kl_loss, settings=KlSettings,
    summary="gradient ascent on forget plus KL to the original model on retain",
    config_defaults={"schedule": {"chunk_size": None, "ratio": 1, "epochs_per_chunk": 5}},
    reference_view=answer_log_distributions,
    reference_roles=("retain",),
))
