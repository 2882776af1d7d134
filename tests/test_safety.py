"""The safety promises: bad input is one line and exit code 2 in every command, outputs never touch
inputs, and a kill inside a checkpoint write loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unlearnlm.cli import main
from unlearnlm.config import load_config
from unlearnlm.engine import unlearn

SRC = Path(__file__).resolve().parents[1] / "src"


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) with the sha256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    """The console entry point in this process: its exit code and its stderr lines."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capfd.readouterr().err
    return exited.value.code, [line for line in err.splitlines() if line.strip()]


# --- bad input: one line, exit code 2, nothing written -----------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, micro_data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    rows = [json.loads(line) for line in (micro_data_dir / "forget.jsonl").read_text().splitlines()]
    files = {
        "empty": root / "empty.jsonl",
        "missing_field": root / "missing_field.jsonl",
        "not_json": root / "not_json.jsonl",
        "no_questions": root / "no_questions.jsonl",
        "bad_yaml": root / "bad.yaml",
        "no_config_json": root / "no_config_json",
    }
    files["empty"].write_text("")
    files["missing_field"].write_text(json.dumps({k: v for k, v in rows[0].items() if k != "output"}) + "\n")
    files["not_json"].write_text("{not json\n")
    files["no_questions"].write_text("".join(json.dumps(row) + "\n" for row in rows if row["id"][-3:-1] == "sc"))
    files["bad_yaml"].write_text("optim: [unclosed\n")
    files["no_config_json"].mkdir()
    return files


def bad_inputs(model: str, data: str, files: dict[str, Path]) -> dict[str, list[str]]:
    forget, retain = f"{data}/forget.jsonl", f"{data}/retain.jsonl"
    unlearn = ["unlearn", "--model", model, "--forget", forget, "--retain", retain]
    evaluate = ["eval", "--model", model, "--forget", forget, "--retain", retain]
    return {
        # usage errors, from the command-line parser
        "unlearn-missing-option": ["unlearn", "--model", model, "--forget", forget],
        "unlearn-unknown-option": [*unlearn, "--bogus", "1"],
        "eval-missing-option": ["eval", "--model", model],
        "target-bad-choice": ["target", "--data", data, "--size", "huge"],
        "bench-bad-int": ["bench", "--target-seed", "x"],
        "unknown-command": ["forget-everything"],
        # paths and files
        "unlearn-no-model": ["unlearn", "--model", f"{data}/nowhere", "--forget", forget, "--retain", retain],
        "unlearn-model-without-config": ["unlearn", "--model", str(files["no_config_json"]), "--forget", forget,
                                         "--retain", retain],
        "unlearn-no-forget-file": ["unlearn", "--model", model, "--forget", f"{data}/none.jsonl", "--retain", retain],
        "unlearn-empty-forget": ["unlearn", "--model", model, "--forget", str(files["empty"]), "--retain", retain],
        "unlearn-row-missing-field": ["unlearn", "--model", model, "--forget", str(files["missing_field"]),
                                      "--retain", retain],
        "unlearn-not-json": ["unlearn", "--model", model, "--forget", str(files["not_json"]), "--retain", retain],
        "unlearn-no-preset": [*unlearn, "--config", "no-such-preset"],
        "unlearn-bad-yaml": [*unlearn, "--config", str(files["bad_yaml"])],
        "eval-no-model": ["eval", "--model", f"{data}/nowhere", "--forget", forget, "--retain", retain],
        "eval-utility-without-questions": [*evaluate, "--utility", str(files["no_questions"])],
        "eval-members-alone": [*evaluate, "--mia-members", forget],
        "target-no-data": ["target", "--data", f"{data}/nowhere"],
        "bench-zero-grid": ["bench", "--grid", "0"],
        "bench-unknown-method": ["bench", "--method", "no-such-method"],
        "demo-no-preset": ["demo", "--config", "no-such-preset"],
        "demo-bad-size": ["demo", "--size", "huge"],
        # settings, validated when the configuration loads
        "unknown-setting": [*unlearn, "--set", "optim.lrr=1"],
        "override-without-value": [*unlearn, "--set", "optim.lr"],
        "unknown-method": [*unlearn, "--method", "forget-harder"],
        "chunk-size-zero": [*unlearn, "--set", "schedule.chunk_size=0"],
        "ratio-negative": [*unlearn, "--set", "schedule.ratio=-1"],
        "epochs-zero": [*unlearn, "--set", "schedule.epochs_per_chunk=0"],
        "lr-negative": [*unlearn, "--set", "optim.lr=-1"],
        "lr-zero": [*unlearn, "--set", "optim.lr=0"],
        "batch-size-zero": [*unlearn, "--set", "optim.batch_size=0"],
        "grad-accum-zero": [*unlearn, "--set", "optim.grad_accum=0"],
        "warmup-negative": [*unlearn, "--set", "optim.warmup_steps=-2"],
        "grad-norm-zero": [*unlearn, "--set", "optim.max_grad_norm=0"],
        "lr-not-a-number": [*unlearn, "--set", "optim.lr=fast"],
        "lora-rank-zero": [*unlearn, "--set", "lora.enabled=true", "--set", "lora.r=0"],
        "lora-dropout-one": [*unlearn, "--set", "lora.dropout=1"],
        "last-k-zero": [*unlearn, "--set", "layers.last_k=0"],
        "layer-index-negative": [*unlearn, "--set", "layers.indices=[-1]"],
        "layer-index-beyond-the-model": [*unlearn, "--set", "layers.indices=[7]"],
        "last-k-beyond-the-model": [*unlearn, "--set", "layers.last_k=9"],
        "max-length-one": [*unlearn, "--set", "max_length=1"],
        "guard-negative": [*unlearn, "--set", "guard.max_forget_loss=-5"],
        "adapter-without-lora": [*unlearn, "--save", "adapter"],
        "metric-without-its-sets": [*unlearn, "--val-forget", forget, "--val-retain", retain],
        "validation-every-zero": [*unlearn, "--set", "validation.every_steps=0"],
        "method-arg-unknown": [*unlearn, "--set", "method_args.retain_wieght=1"],
    }


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(micro_model_dir, micro_data_dir, bad_files, tmp_path,
                                                               capfd, monkeypatch):
    monkeypatch.setenv("UNLEARNLM_CACHE", str(tmp_path / "cache"))  # a demo or bench that started would build here
    table = bad_inputs(str(micro_model_dir), str(micro_data_dir), bad_files)
    assert len(table) >= 25
    failures = []
    for name, argv in table.items():
        out = tmp_path / name
        if name != "unknown-command":
            argv = [*argv, "--out", str(out)]
        code, lines = run_cli(argv, capfd)
        written = [p.name for p in tmp_path.iterdir() if p.name not in ("cache",)]
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or written or (tmp_path / "cache").exists():
            failures.append(f"{name}: exit {code}, stderr {lines[:3]}, written {written}")
    assert not failures, "\n".join(failures)
