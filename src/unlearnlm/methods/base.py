"""What a method is: a loss over (logits, batch) plus its default settings and data schedule.

Everything a method's loss may need is computed here once, so methods stay a few lines each:
token log-probabilities restricted to answer tokens (labels != -100) of real positions, and the
hidden states of the layers a method declares (``Method.hidden_layers``, filled in by ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NotRequired, Optional, TypedDict

import torch
import torch.nn.functional as F

from unlearnlm.data.schedule import Phase, chunk_schedule
from unlearnlm.data.tokenize import IGNORE_INDEX
from unlearnlm.errors import UserError
from unlearnlm.settings import build_dataclass


class Batch(TypedDict):
    """What a loss reads. The engine fills every key; a test may build only those its loss reads."""

    input_ids: NotRequired[torch.Tensor]  # [B, T], right-padded
    attention_mask: NotRequired[torch.Tensor]  # [B, T], 1 on real tokens
    labels: torch.Tensor  # [B, T], IGNORE_INDEX off the answer
    is_forget: torch.Tensor  # [B] bool
    keys: NotRequired[list[str]]  # one per row, the reference cache's key
    share: NotRequired[float]  # this process's weight in the global batch (data parallelism)
    # The declared layers' hidden states ([B, T, H] each) of the model being trained ...
    hidden: NotRequired[dict[int, torch.Tensor]]
    # ... and of the original model, on the rows of ``reference_roles`` (zeros on the others).
    reference_hidden: NotRequired[dict[int, torch.Tensor]]


LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
# (settings, number of decoder layers) -> indices into transformers' ``hidden_states``: 0 is the
# embedding output, i the output of decoder layer i (counted from 1).
HiddenLayers = Callable[[Any, int], tuple[int, ...]]


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each label, the labels, and the mask of answer positions."""
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits, targets.masked_fill(~mask, 0), mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at every answer position (0 elsewhere) and the answer mask, shape [B, T-1]."""
    logits, targets, mask = shifted(logits, labels)
    # Over the flattened rows, with the vocabulary last: on the CPU, cross-entropy with the classes in
    # dimension 1 (``transpose(1, 2)``) was off by up to 3e-5 per token against float64, 15 times the
    # error of this layout, the one transformers' and the authors' losses use (see docs/parity.md).
    flat = logits.float().reshape(-1, logits.shape[-1])
    logp = -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)
    return logp * mask, mask


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over each example's answer tokens, shape [B]."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Total log-probability of each example's answer, shape [B]."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(dim=1)


def answer_log_distributions(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Full-vocabulary log-probabilities at each example's answer positions: a list of [n_i, V]."""
    logits, _, mask = shifted(logits, labels)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [logp[row][mask[row]] for row in range(logp.shape[0])]


def mix_roles(is_forget: torch.Tensor, forget_values: torch.Tensor, retain_values: torch.Tensor) -> torch.Tensor:
    """The batch loss: the mean over examples of each row's forget or retain term."""
    return torch.where(is_forget, forget_values, retain_values).mean()


def role_means(per_example: torch.Tensor, is_forget: torch.Tensor) -> dict[str, float]:
    """Mean of a per-example quantity over forget and retain rows, for the logs."""
    stats: dict[str, float] = {}
    detached = per_example.detach().float()
    if is_forget.any():
        stats["forget_loss"] = detached[is_forget].mean().item()
    if (~is_forget).any():
        stats["retain_loss"] = detached[~is_forget].mean().item()
    return stats


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def forward(model: torch.nn.Module, batch: Batch, layers: tuple[int, ...] = (), key: str = "hidden") -> torch.Tensor:
    """The model's logits on ``batch``; with ``layers``, their hidden states go to ``batch[key]``.

    Hidden states are asked for only when a method declares layers: the plain call is the one every
    logits-only method has always made, so their runs stay bit-identical.
    """
    if not layers:
        return model(**model_inputs(batch)).logits
    outputs = model(**model_inputs(batch), output_hidden_states=True)
    batch[key] = {layer: outputs.hidden_states[layer] for layer in layers}
    return outputs.logits


def schedule_from_config(n_forget: int, n_retain: int, config: Any, settings: Any, seed: int) -> list[Phase]:
    """The default schedule of every method: the chunk schedule with the config's settings."""
    plan = config.schedule
    return chunk_schedule(n_forget, n_retain, plan.chunk_size, plan.ratio, plan.epochs_per_chunk)


@dataclass
class Method:
    """A registered unlearning method.

    ``loss(logits, batch, settings, reference)`` returns the scalar loss and log metrics; ``batch``
    is a ``Batch``. ``reference_view`` (optional) maps reference-model logits to the per-example
    values the loss compares against (``reference``); ``hidden_layers`` (optional) names the layers
    whose hidden states the loss reads in ``batch["hidden"]``, and with ``reference_hidden`` the
    original model's in ``batch["reference_hidden"]``. The engine supplies the original model's
    values from the adapter-disabled model (LoRA) or from a cache computed once before training.
    """

    name: str
    loss: LossFn
    settings: type
    summary: str
    config_defaults: dict = field(default_factory=dict)
    schedule: Callable[..., list[Phase]] = schedule_from_config
    reference_view: Optional[Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]] = None
    # The rows whose reference values the loss reads; the cache holds only those (others get None).
    reference_roles: tuple[str, ...] = ("forget", "retain")
    hidden_layers: Optional[HiddenLayers] = None
    reference_hidden: bool = False

    def build_settings(self, args: dict) -> Any:
        return build_dataclass(self.settings, args, prefix="method_args")

    def layers(self, settings: Any, n_layers: int) -> tuple[int, ...]:
        """The ``hidden_states`` indices the loss reads, checked against the model's depth."""
        if self.hidden_layers is None:
            return ()
        layers = tuple(self.hidden_layers(settings, n_layers))
        # Not n_layers: transformers' last hidden_states entry follows the final norm, so it is not the
        # output of the last decoder layer that the name promises.
        outside = [layer for layer in layers if not 0 <= layer < n_layers]
        if outside:
            raise UserError(f"method {self.name!r}: layer {outside[0]} is outside the model's hidden states "
                            f"0..{n_layers - 1} (0: the embeddings, i: the output of decoder layer i; the last "
                            f"layer's output is not among them)")
        return layers
