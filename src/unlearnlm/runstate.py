"""Run directories and resumable state: temp-then-rename outputs and per-chunk checkpoints.

A run writes into ``.<name>.partial`` beside the output directory and renames it at the end, so an
output directory is either complete or absent. The partial directory holds ``state/`` (the latest
chunk checkpoint), which ``--resume`` continues from after a kill.

A checkpoint is written whole into ``state.tmp/``, flushed to disk and marked complete, and only then
swapped in: ``state/`` becomes ``state.old/``, ``state.tmp/`` becomes ``state/``, and ``state.old/`` is
removed. A kill at any instant leaves at least one complete checkpoint among the three names, and
:func:`recover_checkpoint` puts it back under ``state/``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from unlearnlm.errors import UserError
from unlearnlm.paths import claim_output, holds_output, lock_output, partial_dir_for, replace_dir, resolved_output

TRAINABLE_FILE = "trainable.safetensors"


def check_output(out_dir: Path, input_paths: list[Path], resume: bool, overwrite: bool) -> None:
    """Refuse a bad output location before anything is loaded or written (``paths.claim_output``:
    no unsafe place, no overlap with an input, no other run writing it), and a partial directory that
    holds a run to resume unless ``resume`` or ``overwrite`` says what to do with it."""
    claim_output(out_dir, overwrite, input_paths)
    partial = partial_dir_for(resolved_output(out_dir))
    if resume and not is_resumable(partial):
        raise UserError(f"{out_dir}: nothing to resume (no complete checkpoint in {partial}); run without --resume")
    if is_resumable(partial) and not resume and not overwrite:
        raise UserError(f"{partial}: an interrupted run is there; use --resume to continue it or --overwrite to start over")


def is_resumable(partial: Path) -> bool:
    """Whether a partial directory holds a finished run or a complete checkpoint (under any of its
    three names)."""
    state = partial / "state"
    return is_finished(partial) or any(_is_complete(place) for place in (state, _staging_dir(state), _previous_dir(state)))


def prepare_output(out_dir: Path, input_paths: list[Path], resume: bool, overwrite: bool) -> Path:
    """Check the output location again, lock it, and return the partial directory to work in.

    Without ``resume`` an earlier partial directory is removed: replaced (``overwrite``), or one that
    holds nothing to resume (a start that failed before its first checkpoint; the lock says that no
    live run owns it).
    """
    check_output(out_dir, input_paths, resume, overwrite)
    target = resolved_output(out_dir)
    partial = partial_dir_for(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_output(target)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    if resume:
        recover_checkpoint(partial / "state")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def run_identity(config: dict, model: str, forget_sha256: str, retain_sha256: str) -> dict:
    """What a run is made from: its resolved settings, the model named and the data's sha256. A
    checkpoint keeps it, and ``--resume`` must bring the same (``check_resume_matches``)."""
    return {"config": config, "model": model, "forget_sha256": forget_sha256, "retain_sha256": retain_sha256}


def check_resume_matches(out_dir: Path, identity: dict) -> None:
    """Refuse to resume a run with other settings or data than it was started with, naming what differs."""
    partial = partial_dir_for(resolved_output(out_dir))
    state = partial / "state"
    complete = [place for place in (state, _staging_dir(state), _previous_dir(state)) if _is_complete(place)]
    try:
        recorded = json.loads((complete[0] / "position.json").read_text()).get("made_from") if complete else None
    except (OSError, ValueError):
        return  # a damaged checkpoint: loading it says so
    if not recorded:
        return
    differences = [key for key in _flat(identity) if _flat(identity)[key] != _flat(recorded).get(key)]
    differences += [key for key in _flat(recorded) if key not in _flat(identity)]
    if differences:
        shown = ", ".join(f"{key} ({_flat(recorded).get(key)!r} -> {_flat(identity).get(key)!r})"
                          if not key.endswith("sha256") else f"{key.removesuffix('_sha256')} data"
                          for key in differences[:3])
        raise UserError(f"--resume with other settings or data than the interrupted run: {shown}"
                        f"{' ...' if len(differences) > 3 else ''}; resume with the original ones, or start over "
                        "with --overwrite")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_finished(partial: Path) -> bool:
    """Whether a partial directory holds a finished run (its ``run.json`` is written last)."""
    return (partial / "run.json").is_file()


def settle_failed_run(out_dir: Path, error: BaseException) -> str:
    """After a run of this process failed with ``error``: keep its partial directory if it can be
    resumed, remove it if not, and say which in a sentence ('' when this process never wrote there,
    or when ``error`` already says what to do)."""
    if isinstance(error, DamagedCheckpoint):
        return ""
    try:
        target = resolved_output(out_dir)
    except UserError:
        return ""
    partial = partial_dir_for(target)
    if not holds_output(target) or not partial.is_dir():
        return ""
    if is_finished(partial):
        return f"the finished model is complete in {partial}: the same command with --resume publishes it to {out_dir}"
    if is_resumable(partial):
        return f"the run is kept in {partial}: the same command with --resume continues it"
    shutil.rmtree(partial, ignore_errors=True)
    return "nothing was kept"


def finalize_output(partial: Path, out_dir: Path) -> None:
    out_dir = out_dir.resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the weights are split across processes (FSDP2 turns parameters into DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def trainable_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on the CPU.

    Under FSDP this gathers every weight from its shards, so every process must call it; only
    processes with ``keep`` copy the result out (the others get an empty dict).
    """
    state = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        whole = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
        if keep:
            state[name] = whole.detach().to("cpu", copy=True).contiguous()
    return state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put whole trainable weights back; under FSDP each process keeps its own shard of them."""
    parameters = dict(model.named_parameters())
    missing = set(state) ^ {name for name, p in parameters.items() if p.requires_grad}
    if missing:
        raise UserError(f"checkpoint does not match this run's trainable parameters ({sorted(missing)[0]} ...)")
    with torch.no_grad():
        for name, tensor in state.items():
            parameter = parameters[name]
            value = tensor.to(parameter.device, parameter.dtype)
            if isinstance(parameter, DTensor):
                # Every process read the whole tensor: each cuts its own shard, nothing is sent.
                value = distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
            parameter.copy_(value)


def save_trainable(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write the weights under a temporary name and rename: a kill never leaves half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{TRAINABLE_FILE}.tmp"
    save_file(state, str(staging))
    _flush(staging)
    os.replace(staging, directory / TRAINABLE_FILE)


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    load_trainable_state(model, load_file(str(directory / TRAINABLE_FILE)))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """The optimizer's state as one process would hold it, keyed as ``optimizer.state_dict()`` keys it
    without sharding, and by parameter name under FSDP (where it is gathered: every process calls)."""
    if not is_sharded(model):
        return optimizer.state_dict() if keep else {}
    if not optimizer.state:
        # torch's gather would first create the state with a zero-gradient step, which AdamW counts.
        return {"state": {}, "lrs": [group["lr"] for group in optimizer.param_groups]} if keep else {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on process 0 only
    full = get_optimizer_state_dict(model, optimizer, options=options)
    return full if keep else {}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The inverse of :func:`optimizer_state`; under FSDP every process calls it with the whole state."""
    if not is_sharded(model):
        optimizer.load_state_dict(saved)
    elif not saved["state"]:
        optimizer.state.clear()
        for group, lr in zip(optimizer.param_groups, saved["lrs"]):
            group["lr"] = lr
    else:
        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def process_rng_state() -> dict:
    """This process's random generators, as plain lists and tensors (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in numpy_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # The current device only: asking for every GPU's state would open a context on each of them.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


COMPLETE_MARKER = "complete"


def save_checkpoint(directory: Path, trainable: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
                    position: dict, rng_states: list[dict]) -> None:
    """Write a checkpoint next to the last good one, then swap them (see the module docstring).

    Plain file writes, for the main process: the states come from :func:`trainable_state` and
    :func:`optimizer_state`. ``rng_states`` holds every process's random state, indexed by process.
    """
    staging, previous = _staging_dir(directory), _previous_dir(directory)
    recover_checkpoint(directory)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_trainable(trainable, staging)
    pause_for_test("writing")
    torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng_states}, staging / "optimizer.pt")
    (staging / "position.json").write_text(json.dumps(position))
    for name in ("optimizer.pt", "position.json"):
        _flush(staging / name)
    # The marker goes last: a directory without it was interrupted and is never resumed from.
    (staging / COMPLETE_MARKER).write_text("")
    _flush(staging / COMPLETE_MARKER)
    _flush(staging)
    pause_for_test("written")

    def between(stage: str) -> None:
        if stage == "renamed":
            _flush(directory.parent)
        pause_for_test({"aside": "swapping", "renamed": "swapped"}[stage])

    replace_dir(staging, directory, aside=previous, on_stage=between)


def recover_checkpoint(directory: Path) -> bool:
    """Finish or undo a checkpoint swap that a kill interrupted; True if a complete checkpoint is
    then at ``directory``.

    The newest complete checkpoint wins: ``state/`` if complete, else a complete ``state.tmp/``
    (killed between the two renames), else ``state.old/``. Incomplete leftovers are removed.
    """
    staging, previous = _staging_dir(directory), _previous_dir(directory)
    if not _is_complete(directory):
        for candidate in (staging, previous):
            if _is_complete(candidate):
                if directory.exists():
                    shutil.rmtree(directory)
                candidate.rename(directory)
                break
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    return _is_complete(directory)


def discard_checkpoint(directory: Path) -> None:
    """Remove a checkpoint, its copies first: killed half way, what is left is still the whole old
    checkpoint or nothing (a run started again from other weights must not go on from it)."""
    for place in (_staging_dir(directory), _previous_dir(directory), directory):
        shutil.rmtree(place, ignore_errors=True)


def _is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def _staging_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def _previous_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + ".old")


def _flush(path: Path) -> None:
    """Force a file's (or a directory's entries') bytes to disk, so a rename never publishes data
    that a power cut could still lose."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def pause_for_test(stage: str) -> None:
    """Test hook for the kill tests: with ``UNLEARNLM_TEST_PAUSE_AT=<stage>:<n>`` the ``n``-th
    checkpoint write announces ``<stage>`` in ``$UNLEARNLM_TEST_PAUSE_FILE`` and waits to be killed."""
    wanted = os.environ.get("UNLEARNLM_TEST_PAUSE_AT")
    if not wanted:
        return
    _PAUSE_COUNTS[stage] = _PAUSE_COUNTS.get(stage, 0) + 1
    if wanted == f"{stage}:{_PAUSE_COUNTS[stage]}":
        Path(os.environ["UNLEARNLM_TEST_PAUSE_FILE"]).write_text(stage)
        while True:
            time.sleep(1)


_PAUSE_COUNTS: dict[str, int] = {}


class DamagedCheckpoint(UserError):
    """A checkpoint marked complete whose files cannot be read back: resuming from it cannot work."""


def load_checkpoint(directory: Path, model, optimizer, scheduler, process_index: int = 0, world_size: int = 1) -> dict:
    """Every process calls this: each restores its weights (or its shard), optimizer and random state."""
    try:
        position = json.loads((directory / "position.json").read_text())
        if position["world_size"] != world_size:
            # The global batch, hence the step count and the data each step sees, depends on it.
            raise UserError(f"this run was started with {position['world_size']} processes; resume it with as many")
        load_trainable(model, directory)
        # Our own file, but still read without unpickling arbitrary objects.
        saved = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"][process_index])
    except UserError:
        raise
    except Exception as err:  # json, safetensors, torch.load and a missing key each raise their own type
        raise DamagedCheckpoint(f"{directory}: the checkpoint is damaged and cannot be resumed "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                "start over with --overwrite") from None
    return position
