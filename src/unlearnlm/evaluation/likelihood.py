"""Tokenization shared across models, and batched forward passes that score text.

Shared by generation, the MIA attacks, the utility score and MMLU. Batches are built from
length-sorted examples (less padding), and the results come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from unlearnlm.data.tokenize import IGNORE_INDEX, Example, collate, length_sorted_batches
from unlearnlm.distributed import gather_in_order, process_share

Progress = Callable[[int], None]


def _fingerprint(tokenizer) -> object:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer is fully described by its serialized pipeline; any other only by identity
    # (the object itself, not id(), so a freed tokenizer's id cannot be mistaken for a new one's).
    return (type(tokenizer).__name__, backend.to_str()) if backend is not None else tokenizer


class TokenCache:
    """Token ids of texts, kept per tokenizer: models that share a tokenizer tokenize the data once."""

    def __init__(self) -> None:
        self._entries: dict[tuple, list[list[int]]] = {}

    def encode(self, tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``tokenizer(text, add_special_tokens=...)["input_ids"]`` for each text."""
        key = (_fingerprint(tokenizer), add_special_tokens, tuple(texts))
        if key not in self._entries:
            # Not verbose: documents longer than the context are windowed, so transformers' warning is noise.
            encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens, verbose=False)["input_ids"] if texts else []
            self._entries[key] = [list(ids) for ids in encoded]
        return self._entries[key]


def encode_texts(
    tokenizer, texts: Sequence[str], cache: TokenCache | None = None, add_special_tokens: bool = True
) -> list[list[int]]:
    return (cache or TokenCache()).encode(tokenizer, texts, add_special_tokens)


def model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients, then the caller's train/eval state back (the engine evaluates mid-training).

    ``no_grad`` rather than ``inference_mode``: a tensor a module caches while evaluating must stay
    usable when training resumes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class TokenStats:
    """Per scored token: its log-probability and, optionally, the mean and standard deviation of
    the log-probability over the model's whole next-token distribution (for Min-K%++)."""

    logprobs: np.ndarray
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def mean_loss(self) -> float:
        return float(-self.logprobs.mean())


def joined(parts: Sequence[TokenStats]) -> TokenStats:
    """One document's statistics from those of its windows, in order."""
    if len(parts) == 1:
        return parts[0]
    def concatenated(name: str) -> np.ndarray | None:
        return None if getattr(parts[0], name) is None else np.concatenate([getattr(part, name) for part in parts])
    return TokenStats(concatenated("logprobs"), concatenated("mu"), concatenated("sigma"))


class StatsBuffer:
    """The statistics of many examples in one preallocated array per quantity, each example a slice.

    Keeping one small array per window instead leaves each between the freed blocks of the
    vocabulary-sized temporaries, and the C allocator then takes fresh memory for every window: a
    5 MB document's evaluation grew past 24 GB that way."""

    def __init__(self, counts: Sequence[int], with_distribution: bool) -> None:
        self.offsets = np.cumsum([0, *counts])
        names = ("logprobs", "mu", "sigma") if with_distribution else ("logprobs",)
        self.arrays = {name: np.empty(int(self.offsets[-1]), dtype=np.float32) for name in names}

    def fill(self, index: int, logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
        """Example ``index``'s statistics (``logits[t]`` predicts ``targets[t]``), upcast to float32
        as transformers' own loss does."""
        start, end = self.offsets[index], self.offsets[index + 1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        values = {"logprobs": log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}
        if "mu" in self.arrays:
            probs = log_probs.exp()
            values["mu"] = (probs * log_probs).sum(-1)
            values["sigma"] = ((probs * log_probs.square()).sum(-1) - values["mu"].square()).clamp(min=0).sqrt()
        for name, value in values.items():
            self.arrays[name][start:end] = value.cpu().numpy()
        return TokenStats(**{name: array[start:end] for name, array in self.arrays.items()})


def token_statistics(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int,
    with_distribution: bool = False,
    progress: Progress | None = None,
) -> list[TokenStats]:
    """Statistics of every labelled token (``labels != IGNORE_INDEX``) of each example.

    Right padding: a causal model's real tokens never see the padding after them, so no position
    ids are needed. The vocabulary-sized log-softmax is taken one row at a time to bound memory. In a
    distributed run each process scores its share of the batches (see ``unlearnlm.distributed``).
    """
    device = model_device(model)
    results: list[TokenStats | None] = [None] * len(examples)
    buffer = StatsBuffer([sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in examples], with_distribution)
    with evaluation_mode(model):
        for batch_indices in process_share(length_sorted_batches([len(example.input_ids) for example in examples], batch_size)):
            batch = collate([examples[index] for index in batch_indices], pad_id, padding_side="right")
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            for row, index in enumerate(batch_indices):
                labels = batch["labels"][row, 1:].to(device)
                scored = labels != IGNORE_INDEX
                results[index] = buffer.fill(index, logits[row, :-1][scored], labels[scored])
            if progress is not None:
                progress(len(batch_indices))
    return gather_in_order(results)


def next_token_logits(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Float32 logits of the token after each prompt, shape ``(len(prompts), vocab)``.

    Left padding with position ids counted over real tokens, so a padded prompt is seen exactly as
    it would be alone and its last position is the last column.
    """
    device = model_device(model)
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    with evaluation_mode(model):
        for batch_indices in length_sorted_batches([len(prompt) for prompt in prompts], batch_size):
            batch = collate([Example(prompts[index], list(prompts[index])) for index in batch_indices], pad_id, "left")
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device),
            ).logits[:, -1].float().cpu()
            for row, index in enumerate(batch_indices):
                rows[index] = logits[row]
            if progress is not None:
                progress(len(batch_indices))
    return torch.stack(rows)  # type: ignore[arg-type]
