"""Run directories and resumable state: temp-then-rename outputs and per-chunk checkpoints.

A run writes into ``.<name>.partial`` beside the output directory and renames it at the end, so an
output directory is either complete or absent. The partial directory holds ``state/`` (the latest
chunk checkpoint), which ``--resume`` continues from after a kill.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from unlearnlm.errors import UserError


TRAINABLE_FILE = "trainable.safetensors"


def partial_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def prepare_output(out_dir: Path, input_paths: list[Path], resume: bool, overwrite: bool) -> Path:
    """Check the output location and return the partial directory to work in."""
    out_dir = out_dir.resolve()
    for source in input_paths:
        source = source.resolve()
        if out_dir == source or source in out_dir.parents:
            raise UserError(f"{out_dir}: refusing to write inside the input {source}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: output directory exists and is not empty (use --overwrite)")
    partial = partial_dir_for(out_dir)
    if partial.exists() and not resume:
        if not overwrite:
            raise UserError(f"{partial}: an interrupted run is there; use --resume to continue it or --overwrite to start over")
        shutil.rmtree(partial)
    if resume and not (partial / "state" / "position.json").is_file():
        raise UserError(f"{out_dir}: nothing to resume (no checkpoint in {partial})")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


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
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / TRAINABLE_FILE))


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


def save_checkpoint(directory: Path, trainable: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
                    position: dict, rng_states: list[dict]) -> None:
    """Write a checkpoint next to the old one, then swap, so a kill mid-write loses nothing.

    Plain file writes, for the main process: the states come from :func:`trainable_state` and
    :func:`optimizer_state`. ``rng_states`` holds every process's random state, indexed by process.
    """
    staging = directory.with_name(directory.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_trainable(trainable, staging)
    torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng_states}, staging / "optimizer.pt")
    (staging / "position.json").write_text(json.dumps(position))
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def load_checkpoint(directory: Path, model, optimizer, scheduler, process_index: int = 0, world_size: int = 1) -> dict:
    """Every process calls this: each restores its weights (or its shard), optimizer and random state."""
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
    return position
