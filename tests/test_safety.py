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
from unlearnlm.recipe import unlearn

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
        "train-outside-without-layers": [*unlearn, "--set", "layers.train_outside=[lm_head]"],
        "append-eos-not-a-bool": [*unlearn, "--set", "append_eos=maybe"],
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


# --- outputs never touch inputs ------------------------------------------------------------------------


@pytest.fixture
def nest(micro_model_dir, micro_data_dir, tmp_path) -> Path:
    """A directory D holding a model (D/model) and data (D/data): the inputs a careless --out could hit."""
    import shutil

    nest = tmp_path / "D"
    shutil.copytree(micro_model_dir, nest / "model")
    shutil.copytree(micro_data_dir, nest / "data")
    return nest


def overlap_cases(nest: Path) -> dict[str, list[str]]:
    model, data = nest / "model", nest / "data"
    rows = ["--forget", str(data / "forget.jsonl"), "--retain", str(data / "retain.jsonl")]
    unlearn = ["unlearn", "--model", str(model), *rows]
    evaluate = ["eval", "--model", str(model), *rows]
    return {
        "unlearn-out-contains-the-model": [*unlearn, "--out", str(nest)],
        "unlearn-out-is-the-model": [*unlearn, "--out", str(model)],
        "unlearn-out-inside-the-model": [*unlearn, "--out", str(model / "unlearned")],
        "unlearn-out-contains-the-data": ["unlearn", "--model", str(model), *rows, "--out", str(data)],
        "unlearn-out-is-a-data-file": [*unlearn, "--out", str(data / "forget.jsonl")],
        "unlearn-out-contains-a-validation-set": [*unlearn, "--val-forget", str(data / "forget.jsonl"),
                                                  "--val-retain", str(data / "retain.jsonl"),
                                                  "--set", "validation.metric=task_aggregate", "--out", str(data)],
        "eval-out-contains-the-model": [*evaluate, "--out", str(nest)],
        "eval-out-inside-the-model": [*evaluate, "--out", str(model / "eval")],
        "target-out-contains-the-data": ["target", "--data", str(data), "--out", str(nest)],
    }


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_output_that_overlaps_an_input_is_refused_and_the_input_survives(overwrite, nest, capfd):
    before = tree_digest(nest)
    for name, argv in overlap_cases(nest).items():
        code, lines = run_cli([*argv, *(["--overwrite"] if overwrite else [])], capfd)
        assert code == 2 and len(lines) == 1 and "overlaps the input" in lines[0], (name, lines)
        assert tree_digest(nest) == before, name
    assert sorted(p.name for p in nest.parent.iterdir()) == ["D"]  # no partial or staging directory either


def test_the_demo_refuses_an_output_that_holds_the_model_cache(tmp_path, capfd, monkeypatch):
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    (cache / "keep").write_text("x")
    monkeypatch.setenv("UNLEARNLM_CACHE", str(cache))
    code, lines = run_cli(["demo", "--out", str(tmp_path / "work")], capfd)
    assert code == 2 and len(lines) == 1 and "overlaps the input" in lines[0]
    assert (cache / "keep").read_text() == "x"


# --- a kill inside a checkpoint write -----------------------------------------------------------------

KILL_SETTINGS = ["schedule.chunk_size=4", "schedule.ratio=1", "schedule.epochs_per_chunk=2", "optim.lr=1e-3",
                 "optim.batch_size=2", "max_length=48", "method=kl", "optim.optimizer_reset=never"]
# Where runstate.save_checkpoint pauses (its test hook), and which of the three checkpoint names hold
# a complete checkpoint at that instant: the swap is the moment the old code had none.
KILL_POINTS = {
    "writing": {"state": True, "state.tmp": False},
    "written": {"state": True, "state.tmp": True},
    "swapping": {"state.old": True, "state.tmp": True},
    "swapped": {"state": True, "state.old": True},
}
SECOND_CHECKPOINT = 2  # the first is written at step 0, the second after chunk 1


def unlearn_in_process(model_dir: Path, data_dir: Path, out: Path, resume: bool = False) -> dict:
    config = load_config(None, KILL_SETTINGS)
    return unlearn(model_dir, data_dir / "forget.jsonl", data_dir / "retain.jsonl", out, config,
                   resume=resume, show_progress=False)


def start_paused_run(model_dir: Path, data_dir: Path, out: Path, stage: str, signal_file: Path) -> subprocess.Popen:
    overrides = [arg for setting in KILL_SETTINGS for arg in ("--set", setting)]
    command = [sys.executable, "-m", "unlearnlm", "unlearn", "--model", str(model_dir), "--forget",
               str(data_dir / "forget.jsonl"), "--retain", str(data_dir / "retain.jsonl"), "--out", str(out), *overrides]
    # The same thread count as this process, so that both sides sum in the same order.
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "CUDA_VISIBLE_DEVICES": "", "UNLEARNLM_TEST_PAUSE_AT": f"{stage}:{SECOND_CHECKPOINT}",
           "UNLEARNLM_TEST_PAUSE_FILE": str(signal_file)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when_paused(process: subprocess.Popen, signal_file: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not signal_file.exists():
        assert process.poll() is None, f"the run ended before pausing: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_kill_anywhere_inside_a_checkpoint_write_resumes_to_the_uninterrupted_model(micro_model_dir, micro_data_dir,
                                                                                     tmp_path):
    unlearn_in_process(micro_model_dir, micro_data_dir, tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    runs = {stage: start_paused_run(micro_model_dir, micro_data_dir, tmp_path / stage, stage, tmp_path / f"{stage}.paused")
            for stage in KILL_POINTS}
    for stage, process in runs.items():
        kill_when_paused(process, tmp_path / f"{stage}.paused")
    for stage, complete in KILL_POINTS.items():
        partial = tmp_path / f".{stage}.partial"
        present = {path.name: (path / "complete").is_file() for path in partial.iterdir() if path.name.startswith("state")}
        assert present == complete, stage
        unlearn_in_process(micro_model_dir, micro_data_dir, tmp_path / stage, resume=True)
        resumed = load_file(str(tmp_path / stage / "model.safetensors"))
        assert all(torch.equal(straight[name], resumed[name]) for name in straight), stage
        assert log_losses(tmp_path / stage) == log_losses(tmp_path / "straight"), stage
        assert not partial.exists()


def log_losses(out: Path) -> list[tuple]:
    rows = map(json.loads, (out / "unlearn_log.jsonl").read_text().splitlines())
    return [(row.get("step"), row.get("loss")) for row in rows]
