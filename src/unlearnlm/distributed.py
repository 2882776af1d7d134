"""The process group of a distributed run: joining and leaving it, the accelerator over it, and
evaluation shared between its processes with the results of one process.

Work is dealt out by whole batches, never re-batched: each process runs every ``world``-th of the
very batches one process would run, so every row is padded, and therefore computed, as it would be
alone, and the scores cannot depend on the number of processes. Dealing round-robin rather than in
contiguous blocks (accelerate's ``split_between_processes``) keeps the load even, since batches come
sorted by length.

These are collectives: in a distributed run every process must call them (the engine's validator
does). Outside one they change nothing.

A model sharded across the processes (FSDP) cannot share work this way: each of its forward passes
gathers weights from every process, so all processes must run the same passes in step. Inside
:func:`in_lockstep` every process runs every batch, and ``generate`` keeps finished processes
stepping until all are done (its ``synced_gpus``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from unlearnlm.errors import UserError

T = TypeVar("T")

_lockstep = False


def _distributed() -> bool:
    # The process group torchrun / accelerate launch set up; reading it creates no state of its own.
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_and_world() -> tuple[int, int]:
    if _distributed() and not _lockstep:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_launched_processes() -> bool:
    """Join the process group of a ``torchrun`` / ``accelerate launch`` start, each process on its
    own GPU, so that evaluation shares out its batches. True on the main process (and outside a launch).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def leave_process_group() -> None:
    """Every process waits for the others, then closes the process group itself.

    Left to interpreter exit, the group's communication threads are torn down by static
    destructors in no fixed order while a peer may still be writing results, and a process can
    abort ("terminate called without an active exception") after its work succeeded.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def in_lockstep() -> Iterator[None]:
    """Every process evaluates every row, for a model sharded across the processes."""
    global _lockstep
    previous, _lockstep = _lockstep, True
    try:
        yield
    finally:
        _lockstep = previous


def synced_generation() -> bool:
    """``generate(synced_gpus=...)``: whether processes must keep stepping until all are done."""
    return _lockstep and _distributed()


def process_share(batches: Sequence[T]) -> Sequence[T]:
    """The batches this process runs."""
    rank, world = _rank_and_world()
    return batches[rank::world]


def gather_in_order(results: list[T | None]) -> list[T]:
    """Every process's results, in the original order, on every process.

    ``results`` holds this process's results at their positions and ``None`` elsewhere.
    """
    _, world = _rank_and_world()
    if world == 1:
        return results  # type: ignore[return-value]
    parts: list[dict[int, T] | None] = [None] * world
    dist.all_gather_object(parts, {index: value for index, value in enumerate(results) if value is not None})
    merged = {index: value for part in parts for index, value in part.items()}  # type: ignore[union-attr]
    return [merged[index] for index in range(len(results))]


def build_accelerator(**options) -> Accelerator:
    """One process, data parallel (DDP) or sharded (FSDP2) over the processes that torchrun /
    accelerate launch started; ``options`` are more ``Accelerator`` arguments (the trackers).

    FSDP1 and DeepSpeed are refused: the checkpoints, the best state and the saved model gather the
    trainable weights with FSDP2's DTensor API, which they do not use.
    """
    # The main process alone writes checkpoints and the final model (under FSDP it first rebuilds the
    # whole model) while the others wait at a barrier: allow more than NCCL's default 10 minutes.
    waiting = InitProcessGroupKwargs(timeout=timedelta(hours=1))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[waiting], **options)
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UserError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                        "(see resources/accelerate/fsdp.yaml)")
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"{kind.value} is not supported; for models that do not fit one GPU use FSDP2 "
                        "(accelerate config resources/accelerate/fsdp.yaml), see docs/scale.md")
    return accelerator
