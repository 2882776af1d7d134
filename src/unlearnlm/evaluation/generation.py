"""Greedy generation for the regurgitation and knowledge scores.

Two modes give the same strings (up to floating-point ties):

- official: the organizers' loop, one prompt at a time, ``model.generate(input_ids,
  do_sample=False, max_new_tokens=256, pad_token_id=eos)``;
- batched: prompts sorted by length, left-padded, with an attention mask that hides the padding and
  position ids counted over real tokens only, so each row sees the positions it would see alone.
  ``generate`` keeps finished rows padded while the others run on; each row is cut at its first EOS.
  Rows still running after ``REGROUP_AFTER`` new tokens leave their batches and go on together in new
  batches, carrying their keys and values: the few rows that run to the length limit then no longer
  hold up (and pay for) every batch they started in. The keys and values are
  kept in a :class:`GrowingCache`, which holds the same tensors as ``generate``'s own cache without
  copying all of them at every step.

Either way only the new tokens are decoded, with ``skip_special_tokens=True`` and the
``clean_up_tokenization_spaces=True`` clean-up (see :func:`decode_new_tokens`). Prompts are token ids from
:func:`unlearnlm.data.tokenize.encode_prompt` (the tokenizer's default special tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as nn_functional
from transformers.cache_utils import Cache, DynamicLayer

from unlearnlm.data.tokenize import Example, collate, length_sorted_batches
from unlearnlm.distributed import gather_in_order, process_share, synced_generation
from unlearnlm.evaluation.likelihood import Progress, evaluation_mode, model_device

MAX_NEW_TOKENS = 256
# New-token counts at which the rows still running are regrouped (see the module's docstring).
# Chosen on the bench's unlearned models, where half the answers end within 20 tokens and about one
# row in six runs to the limit.
REGROUP_AFTER = (16, 48, 128)


class GrowingLayer(DynamicLayer):
    """A decoder layer's keys and values in buffers with room to spare: a decoding step writes its one
    position, where transformers' ``DynamicLayer`` concatenates, copying the whole cache each step.

    Measured on a 4-layer bench model at one thread, without a profiler (which inflated the
    copying's share): about 10% less decoding time, greedy and sampled, the same strings. It returns
    views of the first ``length`` positions, so attention still spans only the real sequence.
    """

    spare = MAX_NEW_TOKENS  # positions added beyond the need at each growth: one growth per generate call

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            self._grow(key_states, value_states, end + self.spare)
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.length:end, :] = states
        self.length = end
        self.keys, self.values = (buffer[..., :end, :] for buffer in self.buffers)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        previous = self.buffers
        self.buffers = tuple(states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
                             for states in (key_states, value_states))
        if previous is not None:
            for buffer, old in zip(self.buffers, previous):
                buffer[..., :self.length, :] = old[..., :self.length, :]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.buffers is not None:
            self.length = self.keys.shape[-2]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuffer(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuffer(lambda tensor: tensor[indices, ...])

    def _rebuffer(self, reshape) -> None:
        if self.get_seq_length() > 0:
            keys, values = reshape(self.keys), reshape(self.values)
            self.buffers, self.length = None, 0
            self.update(keys, values)


class GrowingCache(Cache):
    """A cache of :class:`GrowingLayer`, one per decoder layer, created as ``generate`` reaches them."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)


def decoding_cache(model) -> GrowingCache | None:
    """A fresh :class:`GrowingCache` for one ``generate`` call where every layer attends to the whole
    sequence; None (``generate``'s default cache) for models with sliding-window or other layer kinds."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any(kind != "full_attention" for kind in layer_types):
        return None
    return GrowingCache()


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids ``generate`` stops at: the model's generation config, as in the official run, else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return list(configured) if isinstance(configured, (list, tuple)) else [configured]


def _greedy_settings(model, tokenizer, max_new_tokens: int) -> dict:
    return {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.eos_token_id,
        "eos_token_id": stop_token_ids(model, tokenizer),
        "synced_gpus": synced_generation(),
    }


def decode_new_tokens(tokenizer, new_ids: Sequence[int]) -> str:
    """``decode(skip_special_tokens=True, clean_up_tokenization_spaces=True)`` as transformers 4 ran it.

    transformers 5 silently skips the clean-up for BPE tokenizers (OLMo's among them), but the
    official strings went through it, so it is applied here explicitly, for every tokenizer.
    """
    text = tokenizer.decode(list(new_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tokenizer.clean_up_tokenization(text)


def cut_at_stop(new_ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens up to and including the first stop token: what a lone, stopped generation holds."""
    for position, token in enumerate(new_ids):
        if token in stop_ids:
            return list(new_ids[: position + 1])
    return list(new_ids)


def generate_official(
    model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = MAX_NEW_TOKENS, progress: Progress | None = None
) -> list[str]:
    """The organizers' loop: one unpadded prompt per ``generate`` call (shared out in a distributed run)."""
    device = model_device(model)
    settings = _greedy_settings(model, tokenizer, max_new_tokens)
    texts: list[str | None] = [None] * len(prompts)
    with evaluation_mode(model):
        for index in process_share(range(len(prompts))):
            input_ids = torch.tensor([prompts[index]], dtype=torch.long, device=device)
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **settings)
            texts[index] = decode_new_tokens(tokenizer, output[0, len(prompts[index]):].tolist())
            if progress is not None:
                progress(1)
    return gather_in_order(texts)


def generate_batched(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Progress | None = None,
    sampling: Mapping[str, object] | None = None,
    regroup_after: Sequence[int] = REGROUP_AFTER,
) -> list[str]:
    """Left-padded batches of similar-length prompts; same strings as :func:`generate_official`.

    In a distributed run each process generates its share of the batches (see ``unlearnlm.distributed``);
    when the processes step in lockstep (sharded weights) no row is regrouped, so that they make the
    same ``generate`` calls. ``sampling`` (e.g. ``{"do_sample": True, "temperature": 1.0, "top_p": 0.9}``)
    replaces greedy decoding, for the audit's extraction attack; the caller seeds torch's generator.
    """
    device = model_device(model)
    settings = {**_greedy_settings(model, tokenizer, max_new_tokens), **(sampling or {})}
    stops = settings["eos_token_id"]
    limits = _round_limits(max_new_tokens, () if settings["synced_gpus"] else regroup_after)
    generated: dict[int, list[int]] = {}
    carried: dict[int, RowCache] = {}  # the waiting rows' keys and values, where the model has a GrowingCache
    waiting: list[list[int]] = [[] for _ in limits]  # rows gathered for each round after the first
    texts: list[str | None] = [None] * len(prompts)

    def decode(round_number: int, batch_indices: list[int]) -> None:
        limit = limits[round_number]
        sequences = [[*prompts[index], *generated.get(index, ())] for index in batch_indices]
        new_ids, cache = _generate_batch(model, sequences, [carried.pop(index, None) for index in batch_indices],
                                         tokenizer.eos_token_id, device, {**settings, "max_new_tokens": limit})
        for row, (index, ids) in enumerate(zip(batch_indices, new_ids)):
            kept = cut_at_stop(ids, stops)
            generated[index] = [*generated.get(index, ()), *kept]
            if len(kept) == limit and kept[-1] not in stops and round_number + 1 < len(limits):
                if cache is not None:  # all but the last token, which the next round feeds
                    carried[index] = _row_cache(cache, row, len(prompts[index]) + len(generated[index]) - 1)
                waiting[round_number + 1].append(index)
                continue
            texts[index] = decode_new_tokens(tokenizer, generated.pop(index))
            if progress is not None:
                progress(1)
        del cache
        # A full batch goes on at once, so that fewer than a batch of rows wait at each round.
        following = waiting[round_number + 1] if round_number + 1 < len(limits) else []
        if len(following) >= batch_size:
            batch_indices, following[:] = following[:batch_size], following[batch_size:]
            decode(round_number + 1, batch_indices)

    with evaluation_mode(model):
        for batch_indices in process_share(length_sorted_batches([len(prompt) for prompt in prompts], batch_size)):
            decode(0, batch_indices)
        for round_number in range(1, len(limits)):
            rows, waiting[round_number] = waiting[round_number], []
            lengths = [len(prompts[index]) + len(generated[index]) for index in rows]
            for batch in length_sorted_batches(lengths, batch_size):
                decode(round_number, [rows[position] for position in batch])
    return gather_in_order(texts)


def _round_limits(max_new_tokens: int, regroup_after: Sequence[int]) -> list[int]:
    """How many new tokens each round may add: up to each regrouping point, then up to the limit."""
    points = [point for point in sorted(set(regroup_after)) if 0 < point < max_new_tokens] + [max_new_tokens]
    return [point - previous for previous, point in zip([0, *points], points)]


RowCache = list[tuple[torch.Tensor, torch.Tensor]]  # one row's keys and values, layer by layer


def _generate_batch(model, sequences: list[list[int]], carried: list[RowCache | None], pad_id: int, device,
                    settings: Mapping) -> tuple[list[list[int]], Cache | None]:
    """One left-padded ``generate`` call: each row's new tokens, uncut (padding after a stop included),
    and the batch's :class:`GrowingCache` (None where the model has none).

    Where every row carries its keys and values (all its tokens but the last), they are left-padded into
    the cache, and ``generate`` reads only the last token of each row."""
    batch = collate([Example(sequence, list(sequence)) for sequence in sequences], pad_id, padding_side="left")
    width = batch["input_ids"].shape[1]
    cache = decoding_cache(model)
    if cache is not None and all(rows is not None for rows in carried):
        for layer, states in enumerate(zip(*carried)):
            keys, values = (torch.stack([nn_functional.pad(row[part], (0, 0, width - 1 - row[part].shape[-2], 0))
                                         for row in states]).to(device) for part in (0, 1))
            cache.update(keys, values, layer)
    output = model.generate(
        batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        **settings,
        **({} if cache is None else {"cache": cache}),
    )
    return output[:, width:].tolist(), cache


def _row_cache(cache: Cache, row: int, length: int) -> RowCache:
    """A row's keys and values over its last ``length`` positions (its real tokens: padding is on the
    left), copied to the CPU's memory while the row waits, so that an accelerator holds one batch's."""
    return [tuple(states[row, :, -length:].to("cpu", copy=True) for states in (layer.keys, layer.values))
            for layer in cache.layers]


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    official: bool = False,
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Progress | None = None,
) -> list[str]:
    if official:
        return generate_official(model, tokenizer, prompts, max_new_tokens, progress)
    return generate_batched(model, tokenizer, prompts, batch_size, max_new_tokens, progress)
