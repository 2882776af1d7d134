"""Two FSDP2 processes (gloo, on CPU), started by ``accelerate launch`` with the shipped fsdp.yaml,
against one process with the same global batch.

accelerate turns FSDP on only for GPU-type setups; on CPUs its processes come up as MULTI_CPU with
the FSDP settings of the config in their environment. The worker (the bottom of this file) switches
the state to FSDP with exactly those settings, after which ``accelerator.prepare`` shards the model
with ``fully_shard`` as it does on GPUs: every weight becomes a DTensor split over the two processes,
and the engine's gathers, shard loads, lockstep validation and final save run for real.

Two runs share one launch: layer-focused KL on the memorized micro target, validated after every
chunk (generation, MIA and utility in lockstep), killed in the middle of its second chunk and
resumed (shard loads and the gathered optimizer state); and NPO with LoRA on a random micro model,
with gradient checkpointing and checkpoint selection (the adapter-disabled reference, the gathered
best state, the merge on the rebuilt model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_update
from safetensors.torch import load_file

from unlearnlm.config import load_config
from unlearnlm.recipe import unlearn

SRC = Path(__file__).resolve().parents[1] / "src"
FSDP_CONFIG = SRC / "unlearnlm" / "resources" / "accelerate" / "fsdp.yaml"

COMMON = ["schedule.chunk_size=4", "schedule.ratio=1", "schedule.epochs_per_chunk=2", "optim.lr=5e-3", "max_length=48",
          "validation.max_new_tokens=8", "validation.batch_size=4"]
# optimizer_reset=never: the AdamW state saved after chunk 1 decides the resumed run's steps.
# select=false: the saved model is the last state, the one the resumed run reached.
LAYERS_KL = COMMON + ["method=kl", "layers.last_k=1", "optim.optimizer_reset=never", "validation.select=false"]
LORA_NPO = COMMON + ["method=npo", "lora.enabled=true", "optim.grad_accum=2", "gradient_checkpointing=true",
                     "validation.metric=task_aggregate"]
# --config auto on the memorized micro target with full weights (probes, checks, the settling pass).
AUTO = ["max_length=48"]
KILL_AT_STEP = 11  # chunk 1 has 8 steps of the global batch of 2; the micro target's 10 rows make 3 chunks


def validation(sets: Path) -> list[str]:
    """Every validation set of a target's benchmark sets: the final score can be computed."""
    files = {"forget": "forget", "retain": "retain", "members": "mia_members", "nonmembers": "mia_nonmembers",
             "general": "general"}
    return [f"validation.{name}={sets}/{file}.jsonl" for name, file in files.items()]


def validation_of(data_dir: Path) -> list[str]:
    return [f"validation.forget={data_dir}/forget.jsonl", f"validation.retain={data_dir}/retain.jsonl"]


@pytest.fixture(scope="module")
def fsdp_processes(micro_target, micro_model_dir, micro_data_dir, tmp_path_factory) -> Path:
    from unlearnlm.data.sets import write_unseen

    out = tmp_path_factory.mktemp("fsdp")
    write_unseen(micro_target[0] / "benchmark")  # as unlearnlm target does; the auto run reads it
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "--main_process_port", "0", __file__,
               str(micro_target[0]), str(micro_model_dir), str(micro_data_dir), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def one_process_run(model_dir: Path, data_dir: Path, out: Path, settings: list[str]) -> Path:
    """The same run in this process, with the global batch of the two processes as its batch."""
    config = load_config(None, settings + ["optim.batch_size=2"])
    unlearn(model_dir, data_dir / "forget.jsonl", data_dir / "retain.jsonl", out, config, show_progress=False)
    return out




def validations(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "unlearn_log.jsonl").read_text().splitlines())
    return [row for row in rows if row.get("event") == "validation"]


pytestmark = pytest.mark.slow


def test_fsdp_resumed_layer_run_gives_the_model_and_validations_of_one_process(fsdp_processes, one_process,
                                                                              micro_target, tmp_path):
    target = micro_target[0]
    sets = target / "benchmark"
    one_dir = one_process_run(target, sets, tmp_path / "one", LAYERS_KL + validation(sets))
    two_dir = fsdp_processes / "layers"
    two, one = (json.loads((directory / "run.json").read_text()) for directory in (two_dir, one_dir))
    assert two["distributed_type"] == "FSDP" and two["sharded_weights"] and not one["sharded_weights"]
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 20
    assert json.loads((fsdp_processes / "killed.json").read_text()) == {"interrupted_at_step": KILL_AT_STEP}
    # The trainable count is the whole layer's, not one shard's.
    assert two["trainable_parameters"] == one["trainable_parameters"]
    assert_same_update(two_dir, one_dir, load_file(str(target / "model.safetensors")))
    # Lockstep validation scored what one process scores, and picked the same state.
    seen = [validations(directory) for directory in (two_dir, one_dir)]
    assert [v["step"] for v in seen[0]] == [v["step"] for v in seen[1]] == [8, 16, 20]
    # The scores moved, so agreeing on them means something. On the pretrained-base micro target this
    # short KL run moves the forget and retain means while the final stays at the target's 1/3.
    assert len({(v["final"], v["forget_mean"], v["retain_mean"]) for v in seen[1]}) > 1
    for seen_two, seen_one in zip(*seen):
        for metric in ("final", "task_aggregate", "mia_score", "utility", "forget_mean", "retain_mean"):
            assert seen_two[metric] == pytest.approx(seen_one[metric], abs=1e-6)


def test_fsdp_lora_run_gives_the_merged_model_of_one_process(fsdp_processes, one_process, micro_model_dir,
                                                             micro_data_dir, tmp_path):
    one_dir = one_process_run(micro_model_dir, micro_data_dir, tmp_path / "one", LORA_NPO + validation_of(micro_data_dir))
    two_dir = fsdp_processes / "lora"
    two, one = (json.loads((directory / "run.json").read_text()) for directory in (two_dir, one_dir))
    assert two["sharded_weights"] and two["steps"] == one["steps"] == 12
    # Both kept the state of the first chunk (the random model scores 0 throughout): the saved
    # weights are the best state's, gathered, saved and loaded back under FSDP, not the last ones.
    assert two["best"]["step"] == one["best"]["step"] == 4
    assert_same_update(two_dir, one_dir, load_file(str(micro_model_dir / "model.safetensors")))
    # Only the main process wrote, and nothing was left behind.
    assert sorted(path.name for path in fsdp_processes.iterdir()) == ["auto", "killed.json", "layers", "lora"]


def test_fsdp_auto_run_gives_the_rate_verdict_and_model_of_one_process(fsdp_processes, one_process, micro_target,
                                                                      tmp_path):
    """--config auto under FSDP: the probes, the held-out check after every chunk and the final save
    run sharded. Its checks had left the embedding and the final norm unsharded (they forward with no backward
    after it), so the optimizer's sharded weights were no longer the model's and the first
    checkpoint's optimizer gather failed; every unit is resharded after a check now."""
    from unlearnlm.api import unlearn as unlearn_api

    target, sets = micro_target[0], micro_target[0] / "benchmark"
    one = unlearn_api(target, sets / "forget.jsonl", sets / "retain.jsonl", tmp_path / "one", "auto",
                      unseen=sets / "unseen.jsonl", overrides=AUTO + ["optim.batch_size=2"], show_progress=False)
    two_dir = fsdp_processes / "auto"
    two = json.loads((two_dir / "run.json").read_text())
    assert two["sharded_weights"] and two["world_size"] == 2 and two["steps"] == one["steps"]
    assert [probe["lr"] for probe in two["auto"]["probes"]] == [probe["lr"] for probe in one["auto"]["probes"]]
    assert two["auto"]["lr"] == pytest.approx(one["auto"]["lr"], rel=1e-4)
    assert two["verdict"]["forgotten"] == one["verdict"]["forgotten"]
    for figure in ("forget_loss", "unseen_loss", "mia_auc", "retain_loss", "level", "forget_regurgitated", "retain_kept"):
        assert two["verdict"][figure] == pytest.approx(one["verdict"][figure], abs=2e-3)
    assert_same_update(two_dir, tmp_path / "one", load_file(str(target / "model.safetensors")))


def test_fsdp_version_1_is_refused(monkeypatch):
    from accelerate.utils import DistributedType

    from unlearnlm.distributed import build_accelerator
    from unlearnlm.errors import UserError

    class FakeAccelerator:
        distributed_type = DistributedType.FSDP
        is_fsdp2 = False

        def __init__(self, **_):
            pass

    monkeypatch.setattr("unlearnlm.distributed.Accelerator", FakeAccelerator)
    with pytest.raises(UserError, match="fsdp_version: 2"):
        build_accelerator()


# --- the worker: one of the two processes accelerate launch starts ------------------------------


def enable_fsdp_on_cpu() -> None:
    """Put accelerate in FSDP mode with the plugin its launcher configured (from fsdp.yaml)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true" and not torch.cuda.is_available()
    Accelerator(cpu=True)  # the process group, as MULTI_CPU
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def cli_unlearn(model_dir: str, data_dir: str, out: str, settings: list[str], resume: bool = False,
                options: tuple[str, ...] = ()) -> None:
    from unlearnlm.cli import app

    paths = ["--model", model_dir, "--forget", f"{data_dir}/forget.jsonl", "--retain", f"{data_dir}/retain.jsonl"]
    overrides = [arg for setting in settings + ["optim.batch_size=1"] for arg in ("--set", setting)]
    code = app(["unlearn", *paths, "--out", out, *overrides, *options, *(["--resume"] if resume else [])],
               standalone_mode=False)
    assert code in (None, 0), f"unlearn exited with {code}"


class Killed(Exception):
    """Stands for a kill (click would swallow a KeyboardInterrupt)."""


def worker(target: str, model_dir: str, data_dir: str, out: str) -> None:
    from unlearnlm.engine import Engine

    enable_fsdp_on_cpu()
    sets = f"{target}/benchmark"
    settings = LAYERS_KL + validation(Path(sets))
    original_step, steps = Engine._optimizer_step, {"n": 0}

    def dying_step(self, group):
        steps["n"] += 1
        if steps["n"] == KILL_AT_STEP:
            raise Killed
        return original_step(self, group)

    Engine._optimizer_step = dying_step
    try:
        cli_unlearn(target, sets, f"{out}/layers", settings)
    except Killed:
        if torch.distributed.get_rank() == 0:
            (Path(out) / "killed.json").write_text(json.dumps({"interrupted_at_step": steps["n"]}))
    Engine._optimizer_step = original_step
    cli_unlearn(target, sets, f"{out}/layers", settings, resume=True)
    cli_unlearn(model_dir, data_dir, f"{out}/lora", LORA_NPO + validation_of(Path(data_dir)))
    cli_unlearn(target, sets, f"{out}/auto", AUTO, options=("--unseen", f"{sets}/unseen.jsonl", "--config", "auto"))


if __name__ == "__main__":
    from unlearnlm.distributed import leave_process_group

    worker(*sys.argv[1:])
    leave_process_group()
