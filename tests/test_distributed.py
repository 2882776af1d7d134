"""Two data-parallel processes (gloo, on CPU) against one process with the same global batch.

The two-process runs go through the real launchers: ``accelerate launch`` with the shipped DDP
config for unlearning, ``torchrun`` for evaluation (this file is its worker script, see the bottom).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from unlearnlm.config import load_config
from unlearnlm.engine import unlearn

SRC = Path(__file__).resolve().parents[1] / "src"
DDP_CONFIG = SRC / "unlearnlm" / "resources" / "accelerate" / "ddp.yaml"

# Uneven on purpose: 9 rows per chunk in global batches of 2 leave the last batch to one process
# (the other runs a zero-weight row); grad_accum=2 exercises no_sync; NPO with LoRA exercises the
# adapter-disabled reference forward under DDP.
SETTINGS = ["method=npo", "lora.enabled=true", "schedule.chunk_size=3", "schedule.ratio=2",
            "schedule.epochs_per_chunk=2", "optim.lr=5e-3", "optim.grad_accum=2", "optim.time_budget_s=3600",
            "max_length=48"]


def launch(command: list[str]) -> None:
    # CPU only, whatever the machine: two processes must not share one GPU under NCCL.
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def log_steps(out: Path) -> list[tuple]:
    rows = map(json.loads, (out / "unlearn_log.jsonl").read_text().splitlines())
    return [(row["step"], row["loss"], row.get("forget_loss"), row.get("retain_loss")) for row in rows if "step" in row]


def test_two_processes_train_the_weights_one_process_trains(micro_model_dir, micro_data_dir, tmp_path, monkeypatch):
    paths = ["--model", str(micro_model_dir), "--forget", str(micro_data_dir / "forget.jsonl"),
             "--retain", str(micro_data_dir / "retain.jsonl")]
    overrides = [arg for setting in SETTINGS + ["optim.batch_size=1"] for arg in ("--set", setting)]
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
            "-m", "unlearnlm", "unlearn", *paths, "--out", str(tmp_path / "two"), *overrides])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(None, SETTINGS + ["optim.batch_size=2"])
    unlearn(micro_model_dir, micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", tmp_path / "one", config,
            show_progress=False)

    two, one = (json.loads((tmp_path / name / "run.json").read_text()) for name in ("two", "one"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["steps"] == one["steps"] == 24 and two["stopped_reason"] == "completed"
    before = load_file(str(micro_model_dir / "model.safetensors"))
    after_two, after_one = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("two", "one"))
    assert max((after_one[name] - before[name]).abs().max().item() for name in before) > 1e-3
    for name in before:
        torch.testing.assert_close(after_two[name], after_one[name], rtol=0, atol=1e-5)
    # The log holds the means over the whole global batch, which one process sees directly.
    for row_two, row_one in zip(log_steps(tmp_path / "two"), log_steps(tmp_path / "one"), strict=True):
        assert row_two[0] == row_one[0]
        assert all(a == b or abs(a - b) < 1e-4 for a, b in zip(row_two[1:], row_one[1:]))
    # Only the main process wrote: one output directory, no leftovers.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one", "two"]
