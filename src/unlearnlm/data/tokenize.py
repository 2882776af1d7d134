"""Tokenization for training and scoring.

A training example is ``input``, a space, ``output``, with labels only on the answer, and with
``append_eos`` an EOS token after the answer, labelled too. The SUGD authors trained unlearning rows
without EOS (see docs/methods.md), so unlearning runs default to ``append_eos: false``; a model that
must learn where an answer stops (the tiny benchmark target) asks for it. The prompt is tokenized
exactly as evaluation tokenizes it (the tokenizer's default special tokens), so the model learns to
continue the very prompt it will be asked with.

Attention masks come from the true sequence lengths, never from ``input_ids != pad_id``: with
pad = EOS (the usual setting) that comparison would also mask a real EOS, such as the one ``append_eos``
puts after the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # Free-form tags the engine and the methods read: role ('forget'/'retain'), cache key, ...
    meta: dict = field(default_factory=dict)


def ensure_pad_token(tokenizer) -> None:
    """The official protocol pads with EOS; set it when the tokenizer has no pad token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def token_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``text``'s token ids, without transformers' warning that they outnumber the model's positions:
    every caller cuts or windows them to the context itself."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return token_ids(tokenizer, prompt)


def encode_example(
    tokenizer, prompt: str, answer: str, max_length: int | None = None, *, append_eos: bool, **meta
) -> Example:
    """``prompt`` + " " + ``answer`` (+ EOS with ``append_eos``), labels on the answer (and EOS) only."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = token_ids(tokenizer, " " + answer, add_special_tokens=False)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        answer_ids.append(tokenizer.eos_token_id)
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if max_length is not None and len(input_ids) > max_length:
        # Keep the answer: drop prompt tokens from the left, the part the loss never sees.
        overflow = len(input_ids) - max_length
        input_ids, labels = input_ids[overflow:], labels[overflow:]
    return Example(input_ids=input_ids, labels=labels, meta=dict(meta))


def encode_document(tokenizer, document: str, max_length: int | None = None) -> Example:
    """A whole document with labels on every token (the official MIA loss)."""
    ids = token_ids(tokenizer, document)
    if max_length is not None:
        ids = ids[:max_length]
    return Example(input_ids=ids, labels=list(ids))


def collate(examples: Sequence[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch; the attention mask marks the first ``len(example)`` positions as real."""
    width = max(len(example.input_ids) for example in examples)
    batch_size = len(examples)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        span = slice(0, length) if padding_side == "right" else slice(width - length, width)
        input_ids[row, span] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, span] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if padding_side == "left":
        # Positions count real tokens only, so a left-padded row sees the same positions as unpadded.
        batch["position_ids"] = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return batch


def length_sorted_batches(lengths: Sequence[int], batch_size: int, longest_first: bool = True) -> list[list[int]]:
    """Indices grouped into batches of similar length, so batches carry little padding. Scoring goes
    longest first, so that memory trouble shows at once; ties keep their order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index] if longest_first else lengths[index])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
