"""Two data-parallel processes (gloo, on CPU) against one process with the same global batch.

One ``torchrun`` launch of two processes serves both tests (this file is its worker script, see the
bottom): each process runs ``unlearnlm unlearn`` through the command line, then evaluates the input
model inside the process group the run set up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_update, kill_when_paused
from safetensors.torch import load_file

from unlearnlm.config import load_config
from unlearnlm.data.records import load_records
from unlearnlm.errors import UserError
from unlearnlm.recipe import unlearn
from unlearnlm.runstate import load_checkpoint, process_rng_state, save_checkpoint, trainable_state

SRC = Path(__file__).resolve().parents[1] / "src"
ACCELERATE_CONFIGS = SRC / "unlearnlm" / "resources" / "accelerate"

# Uneven on purpose: 9 rows per chunk in global batches of 2 leave the last batch to one process
# (the other runs a zero-weight row); grad_accum=2 exercises no_sync; NPO with LoRA exercises the
# adapter-disabled reference forward under DDP; the time budget needs the processes to agree.
EVAL_ARGS = ["--batch-size", "3", "--max-new-tokens", "6"]
# --standalone: the rendezvous takes a free port of its own, never the fixed default 29500.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = pytest.mark.slow
SETTINGS = ["method=npo", "lora.enabled=true", "schedule.chunk_size=3", "schedule.ratio=2",
            "schedule.epochs_per_chunk=2", "optim.lr=5e-3", "optim.grad_accum=2", "optim.time_budget_s=3600",
            "max_length=48"]


@pytest.fixture(scope="module")
def two_processes(micro_model_dir, micro_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_processes")
    # CPU only, whatever the machine: two processes must not share one GPU under NCCL.
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, __file__, str(micro_model_dir), str(micro_data_dir), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # The eval command on its own, as a user launches it: it joins the process group itself.
    command = [*TORCHRUN, "-m", "unlearnlm", "eval",
               "--model", str(out / "model"), *data_args(micro_data_dir), "--out", str(out / "eval"), *EVAL_ARGS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results written to") == 1  # one process reported, and wrote
    return out


def data_args(data_dir: Path) -> list[str]:
    return ["--forget", str(data_dir / "forget.jsonl"), "--retain", str(data_dir / "retain.jsonl")]


def log_steps(out: Path) -> list[tuple]:
    rows = map(json.loads, (out / "unlearn_log.jsonl").read_text().splitlines())
    return [(row["step"], row["loss"], row.get("forget_loss"), row.get("retain_loss")) for row in rows if "step" in row]


def test_two_processes_train_the_weights_one_process_trains(two_processes, one_process, micro_model_dir,
                                                            micro_data_dir, tmp_path):
    config = load_config(None, SETTINGS + ["optim.batch_size=2"])
    unlearn(micro_model_dir, micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", tmp_path / "one", config,
            show_progress=False)
    one_dir, two_dir = tmp_path / "one", two_processes / "model"

    two, one = (json.loads((directory / "run.json").read_text()) for directory in (two_dir, one_dir))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["steps"] == one["steps"] == 24 and two["stopped_reason"] == "completed"
    before = load_file(str(micro_model_dir / "model.safetensors"))
    assert_same_update(two_dir, one_dir, before)
    # The log holds the means over the whole global batch, which one process sees directly.
    for row_two, row_one in zip(log_steps(two_dir), log_steps(one_dir), strict=True):
        assert row_two[0] == row_one[0]
        assert all(a == b or a == pytest.approx(b, rel=1e-4) for a, b in zip(row_two[1:], row_one[1:]))
    # Only the main process wrote: the output and the evaluation scores, no partial directory.
    assert sorted(path.name for path in two_processes.iterdir()) == ["eval", "model", "scores.json"]


def test_two_processes_give_the_scores_of_one(two_processes, one_process, micro_model_dir, micro_data_dir):
    one = evaluate_micro_model(micro_model_dir, micro_data_dir)
    two = json.loads((two_processes / "scores.json").read_text())
    # The work was shared (the first process generated half the prompts); the scores did not move.
    assert one["generated"] == {"batched": 36, "official": 36} and two["generated"] == {"batched": 18, "official": 18}
    assert two["results"] == one["results"]


def test_the_eval_command_on_two_processes_writes_what_one_process_writes(two_processes, one_process,
                                                                          micro_data_dir, tmp_path):
    from unlearnlm.cli import app

    app(["eval", "--model", str(two_processes / "model"), *data_args(micro_data_dir), "--out", str(tmp_path / "eval"),
         *EVAL_ARGS],
        standalone_mode=False)
    two, one = (json.loads((directory / "evaluation_results.json").read_text())
                for directory in (two_processes / "eval", tmp_path / "eval"))
    del two["timings"], one["timings"]
    assert two == one and "harmonic-mean-task-aggregate" in one
    assert (two_processes / "eval" / "generations.jsonl").read_text() == (tmp_path / "eval" / "generations.jsonl").read_text()


@pytest.mark.parametrize("pause", ["written:2", "saving:1"])
def test_two_processes_killed_then_resumed_give_the_uninterrupted_model(two_processes, micro_model_dir, micro_data_dir,
                                                                         tmp_path, pause):
    """A SIGKILL to the whole torchrun job (both processes) after its 2nd checkpoint, or during the final
    save (weights written, run.json not), then ``--resume`` under torchrun: the published model is the
    one the uninterrupted two-process run published."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    signal_file = tmp_path / "paused"
    overrides = [arg for setting in SETTINGS + ["optim.batch_size=1"] for arg in ("--set", setting)]
    command = [*TORCHRUN, "-m", "unlearnlm", "unlearn", "--model", str(micro_model_dir), *data_args(micro_data_dir),
               "--out", str(tmp_path / "model"), *overrides]
    paused = {**env, "UNLEARNLM_TEST_PAUSE_AT": pause, "UNLEARNLM_TEST_PAUSE_FILE": str(signal_file)}
    job = subprocess.Popen(command, env=paused, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        kill_when_paused(job, signal_file, kill=lambda: kill_tree(job.pid))
    finally:
        kill_tree(job.pid)
    assert not (tmp_path / "model").exists()
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted, resumed = two_processes / "model", tmp_path / "model"
    assert (resumed / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert log_steps(resumed) == log_steps(uninterrupted)
    record = json.loads((resumed / "run.json").read_text())
    assert (record["steps"], record["stopped_reason"], record["world_size"]) == (24, "completed", 2)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a job scheduler ends a job: torchrun starts
    its workers in sessions of their own, so a kill of torchrun's process group would miss them."""
    tree, index = [pid], 0
    while index < len(tree):
        children = Path(f"/proc/{tree[index]}/task/{tree[index]}/children")
        tree += [int(child) for child in children.read_text().split()] if children.exists() else []
        index += 1
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    for member in tree[1:]:
        while Path(f"/proc/{member}").exists() and "zombie" not in Path(f"/proc/{member}/status").read_text():
            time.sleep(0.1)


def test_shipped_accelerate_configs_are_data_parallel():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("ddp.yaml", "ddp-multinode.yaml"):
        config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
        assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "no"
        assert config.num_processes % config.num_machines == 0


def test_checkpoints_keep_every_process_random_state_and_their_process_count(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states = []
    for seed in (1, 2):  # two processes, two random streams
        torch.manual_seed(seed)
        states.append(process_rng_state())
    save_checkpoint(tmp_path / "state", trainable_state(model), optimizer.state_dict(), scheduler.state_dict(),
                    {"world_size": 2}, states)
    with pytest.raises(UserError, match="started with 2 processes"):
        load_checkpoint(tmp_path / "state", model, optimizer, scheduler, 0, world_size=1)
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(1)
    load_checkpoint(tmp_path / "state", model, optimizer, scheduler, 1, world_size=2)
    assert torch.equal(torch.rand(3), expected)


def evaluate_micro_model(model_dir: Path, data_dir: Path) -> dict[str, dict]:
    """Both generation modes, with the MIA and the utility score (minus the timings), and how many
    prompts this process generated itself."""
    from unlearnlm.evaluation.evaluator import evaluate_model, load_model

    model, tokenizer = load_model(model_dir)
    forget, retain = load_records(data_dir / "forget.jsonl", "forget"), load_records(data_dir / "retain.jsonl", "retain")
    members, nonmembers = [r.input + " " + r.output for r in forget], [r.input + " " + r.output for r in retain[:12]]
    results, generated = {}, {}
    for mode in ("batched", "official"):
        generated[mode] = 0

        def count(phase: str, done: int, total: int, mode: str = mode) -> None:
            generated[mode] += done if phase == "generation" else 0

        scores = evaluate_model(model, tokenizer, forget, retain, members, nonmembers, general=retain[12:],
                                batch_size=3, official=mode == "official", max_new_tokens=6, reporter=count)
        del scores["timings"]
        results[mode] = json.loads(json.dumps(scores, default=float))
    return {"results": results, "generated": generated}


def worker(model_dir: str, data_dir: str, out: str) -> None:
    """One of the two processes torchrun starts: the CLI's unlearn, then an evaluation."""
    from unlearnlm.cli import app

    paths = ["--model", model_dir, *data_args(Path(data_dir))]
    overrides = [arg for setting in SETTINGS + ["optim.batch_size=1"] for arg in ("--set", setting)]
    app(["unlearn", *paths, "--out", f"{out}/model", *overrides], standalone_mode=False)
    results = evaluate_micro_model(Path(model_dir), Path(data_dir))
    if torch.distributed.get_rank() == 0:
        (Path(out) / "scores.json").write_text(json.dumps(results))


if __name__ == "__main__":
    from unlearnlm.distributed import leave_process_group

    worker(*sys.argv[1:])
    leave_process_group()
