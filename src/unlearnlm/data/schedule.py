"""The chunk schedule: which examples are trained on, in which order, for how many epochs.

Chunking is a data schedule, independent of the loss, so every method can use it
(docs/methods.md): the forget set is cut into disjoint chunks of ``chunk_size`` rows in order (a
remainder forms a last, smaller chunk); each chunk gets ``len(chunk) * ratio`` retain rows taken
cyclically by a running index that wraps around, so the whole retain set is used before any row
repeats; within a chunk the rows are interleaved 1 forget : ``ratio`` retain; the chunks are then
unlearned one after another, ``epochs`` epochs each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

FORGET = "forget"
RETAIN = "retain"


@dataclass(frozen=True)
class Item:
    role: str  # FORGET or RETAIN
    index: int  # row index into that set


@dataclass
class Phase:
    """A run of ``epochs`` passes over ``items``, in order. ``name`` is for logs ('chunk 3', 'anneal').

    ``lr``, ``batch_size`` and ``shuffle`` override the run's ``optim.lr``, ``optim.batch_size`` and
    ``schedule.shuffle_within_chunk`` for this phase only (AGAD's annealing has its own).
    """

    name: str
    chunk: int
    items: list[Item]
    epochs: int
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    shuffle: Optional[bool] = None


class CyclicSampler:
    """A running index over ``size`` rows that wraps around."""

    def __init__(self, size: int, start: int = 0):
        self.size = size
        self.position = start

    def take(self, count: int) -> list[int]:
        if self.size == 0:
            return []
        taken = [(self.position + offset) % self.size for offset in range(count)]
        self.position = (self.position + count) % self.size
        return taken


def split_chunks(n_rows: int, chunk_size: int | None) -> list[list[int]]:
    """Disjoint, ordered chunks covering ``range(n_rows)``; ``None`` means one chunk of everything."""
    if chunk_size is None or chunk_size >= n_rows:
        return [list(range(n_rows))] if n_rows else []
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    return [list(range(start, min(start + chunk_size, n_rows))) for start in range(0, n_rows, chunk_size)]


def interleave(forget: list[int], retain: list[int], ratio: int) -> list[Item]:
    """1 forget row, then ``ratio`` retain rows, and so on; leftovers of either go at the end."""
    items: list[Item] = []
    retain_iter = iter(retain)
    for forget_index in forget:
        items.append(Item(FORGET, forget_index))
        for _ in range(ratio):
            retain_index = next(retain_iter, None)
            if retain_index is None:
                break
            items.append(Item(RETAIN, retain_index))
    items.extend(Item(RETAIN, index) for index in retain_iter)
    return items


def chunk_schedule(
    n_forget: int, n_retain: int, chunk_size: int | None, ratio: int, epochs: int
) -> list[Phase]:
    """The SUGD schedule; ``ratio=0`` gives forget-only chunks (gradient ascent)."""
    if ratio < 0 or epochs < 1:
        raise ValueError("ratio must be >= 0 and epochs >= 1")
    sampler = CyclicSampler(n_retain)
    phases = []
    for number, chunk in enumerate(split_chunks(n_forget, chunk_size)):
        retain = sampler.take(len(chunk) * ratio) if ratio and n_retain else []
        phases.append(Phase(name=f"chunk {number + 1}", chunk=number, items=interleave(chunk, retain, ratio), epochs=epochs))
    return phases


def optimizer_steps(n_items: int, global_batch: int, grad_accum: int) -> int:
    micro_batches = math.ceil(n_items / global_batch)
    return math.ceil(micro_batches / grad_accum)


def lr_factors(
    phases: list[Phase], steps_per_epoch: list[int], warmup: int, reset_per_chunk: bool, base_lr: float
) -> list[float]:
    """Multipliers of ``base_lr``, indexed by global step: linear warmup then linear decay to zero,
    per chunk or over the whole run, times the phase's own learning rate over ``base_lr``.

    The shape is transformers' ``get_linear_schedule_with_warmup``: ``s / w`` during the ``w`` warmup
    steps, then ``(n - s) / (n - w)`` over a span of ``n`` steps. Steps count optimizer updates of the
    global batch, so warmup does not depend on the number of processes.
    """
    spans: list[int] = []
    scales: list[float] = []
    for phase, per_epoch in zip(phases, steps_per_epoch):
        total = per_epoch * phase.epochs
        if reset_per_chunk or not spans:
            spans.append(total)
        else:
            spans[-1] += total
        scales.extend([(phase.lr if phase.lr is not None else base_lr) / base_lr] * total)
    factors: list[float] = []
    for span in spans:
        for step in range(span):
            if step < warmup:
                factors.append(step / warmup)
            else:
                factors.append(max(0.0, (span - step) / max(1, span - warmup)))
    return [factor * scale for factor, scale in zip(factors, scales)]
