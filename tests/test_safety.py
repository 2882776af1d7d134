"""The safety promises: bad input is one line and exit code 2 in every command, outputs never touch
inputs, and a kill inside a checkpoint write loses nothing."""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import cli_lines, kill_when_paused
from safetensors.torch import load_file

from unlearnlm.config import load_config
from unlearnlm.recipe import unlearn

SRC = Path(__file__).resolve().parents[1] / "src"


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) with the sha256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


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
        code, lines = cli_lines(argv, capfd)
        written = [p.name for p in tmp_path.iterdir() if p.name not in ("cache",)]
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or written or (tmp_path / "cache").exists():
            failures.append(f"{name}: exit {code}, stderr {lines[:3]}, written {written}")
    assert not failures, "\n".join(failures)


# --- hostile input and faults: one line, the right exit code, nothing written, inputs unchanged --------


@dataclass
class Hostile:
    """One hostile case: the command line (with its own --out, if any), the exit code, a word the
    error line must hold, and a fault to inject (given the monkeypatch) before the command runs."""

    argv: list[str]
    says: str
    code: int = 2
    fault: Optional[Callable] = None


def fail_for(module, name: str, error: BaseException, where: str = "") -> Callable:
    """A fault: ``module.name`` raises ``error`` (when its first argument lies under ``where``)."""
    def inject(patch):
        original = getattr(module, name)

        def failing(*args, **kwargs):
            if where and not str(args[0]).startswith(where):
                return original(*args, **kwargs)
            raise error

        patch.setattr(module, name, failing)
    return inject


def ctrl_c_at(module, name: str) -> Callable:
    """A fault: Ctrl-C (a real SIGINT to this process) when ``module.name`` is called."""
    def inject(patch):
        def interrupted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
        patch.setattr(module, name, interrupted)
    return inject


def write_model_variant(base: Path, into: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(base, into)
    change(into)
    return into


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory, micro_model_dir, micro_data_dir, micro_tokenizer) -> dict[str, Path]:
    """Damaged data, configs and models, written once; the cases only read them."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hostile")
    forget_text = (micro_data_dir / "forget.jsonl").read_text()
    rows = [json.loads(line) for line in forget_text.splitlines()]
    retain_rows = [json.loads(line) for line in (micro_data_dir / "retain.jsonl").read_text().splitlines()]
    files = {name: root / name for name in (
        "invalid_utf8.jsonl", "gzip.jsonl", "surrogate.jsonl", "binary.yaml", "shares_a_row.jsonl",
        "no_answers.jsonl", "docs.jsonl", "docs_again.jsonl", "long_row.jsonl", "config_dir")}
    files["invalid_utf8.jsonl"].write_bytes(b'{"text": "caf\xe9 \xff\xfe is not utf-8"}\n')
    files["gzip.jsonl"].write_bytes(gzip.compress(forget_text.encode()))
    files["surrogate.jsonl"].write_text('{"text": "half of a pair \\ud800 here"}\n')
    files["binary.yaml"].write_bytes(bytes(range(256)) * 4)
    lines = [json.dumps(row) for row in [rows[0], *retain_rows[1:]]]
    files["shares_a_row.jsonl"].write_text("\n".join(lines) + "\n")
    files["no_answers.jsonl"].write_text("".join(json.dumps({**row, "output": " "}) + "\n" for row in rows))
    files["docs.jsonl"].write_text('{"text": "the first secret document"}\n{"text": "the second secret document"}\n')
    files["docs_again.jsonl"].write_text('{"text": "a document to keep"}\n{"text": "the second secret document"}\n')
    long_row = {**rows[0], "input": " ".join(["word"] * 3000)}  # longer than the model's 1,024 positions
    files["long_row.jsonl"].write_text(json.dumps(long_row) + "\n")
    files["config_dir"].mkdir()
    weights = load_file(str(micro_model_dir / "model.safetensors"))

    def truncate(model: Path) -> None:
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[:len(data) // 2])

    def drop_layer(model: Path) -> None:
        save_file({name: value for name, value in weights.items() if ".layers.1." not in name},
                  str(model / "model.safetensors"), metadata={"format": "pt"})

    def small_embedding(model: Path) -> None:
        from conftest import make_micro_model

        make_micro_model(100).save_pretrained(model, safe_serialization=True)

    def remote_code(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(model_type="secret-arch", auto_map={"AutoModelForCausalLM": "modeling_secret.SecretModel"})
        (model / "config.json").write_text(json.dumps(config))

    variants = {"corrupt_config": lambda model: (model / "config.json").write_text('{"model_type": "llama", '),
                "truncated": truncate, "missing_layer": drop_layer, "small_embedding": small_embedding,
                "remote_code": remote_code}
    for name, change in variants.items():
        files[name] = write_model_variant(micro_model_dir, root / name, change)
    return files


def hostile_cases(model: str, data: Path, files: dict[str, Path], scratch: Path) -> dict[str, Hostile]:
    from unlearnlm import recipe, runstate
    from unlearnlm.evaluation import report

    forget, retain = str(data / "forget.jsonl"), str(data / "retain.jsonl")
    out = str(scratch / "out")
    rows = ["--forget", forget, "--retain", retain]
    unlearn = ["unlearn", "--model", model, *rows, "--config", "demo", "--set", "max_length=32"]
    evaluate = ["eval", "--model", model, *rows, "--max-new-tokens", "2"]
    home, foreign, locked = scratch / "home", scratch / "foreign", scratch / "locked"
    loop, ro = scratch / "loop", scratch / "read-only"

    def on(model_dir: Path) -> list[str]:
        return ["unlearn", "--model", str(model_dir), *rows, "--out", out]

    def data_case(command: str, forget_file: Path, says: str, retain_file: str = retain) -> Hostile:
        head = unlearn[:2] if command == "unlearn" else evaluate[:2]
        return Hostile([*head, model, "--forget", str(forget_file), "--retain", retain_file, "--out", out], says)

    def setting(value: str, says: str) -> Hostile:
        return Hostile([*unlearn, "--set", value, "--out", out], says)

    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(scratch / ".out.partial"))
    return {
        # --out: places that hold what a user keeps, never replaced, whatever the flags
        "out-empty-string-overwrite": Hostile([*unlearn, "--out", "", "--overwrite"], "empty"),
        "out-empty-string": Hostile([*unlearn, "--out", ""], "empty"),
        "out-current-directory": Hostile([*unlearn, "--out", str(scratch / "work"), "--overwrite"], "current directory"),
        "out-parent-of-cwd": Hostile([*unlearn, "--out", "..", "--overwrite"], "current directory"),
        "out-filesystem-root": Hostile([*unlearn, "--out", "/", "--overwrite"], "root"),
        "out-home": Hostile([*unlearn, "--out", str(home), "--overwrite"], "home directory"),
        "out-foreign-directory": Hostile([*unlearn, "--out", str(foreign), "--overwrite"], "no unlearnlm output"),
        "eval-out-foreign-directory": Hostile([*evaluate, "--out", str(foreign), "--overwrite"], "no unlearnlm output"),
        "eval-out-empty-string": Hostile([*evaluate, "--out", "", "--overwrite"], "empty"),
        "target-out-current-directory": Hostile(["target", "--data", str(data), "--out", ".", "--overwrite"], "empty"),
        "audit-out-home": Hostile(["audit", "--model", model, *rows, "--out", str(home), "--overwrite"], "home"),
        "bench-out-current-directory": Hostile(["bench", "--out", str(scratch / "work"), "--size", "micro"],
                                               "current directory"),
        "demo-out-is-a-file": Hostile(["demo", "--out", str(foreign / "notes.txt")], "not a directory"),
        "out-symlink-loop": Hostile([*unlearn, "--out", str(loop)], "resolved"),
        "out-read-only": Hostile([*unlearn, "--out", str(ro / "out")], "read-only",
                                 fault=fail_for(os, "open", OSError(errno.EROFS, os.strerror(errno.EROFS)), str(ro))),
        # a second run on an output another run is writing, whatever the flags
        "out-locked": Hostile([*unlearn, "--out", str(locked)], "another run"),
        "out-locked-overwrite": Hostile([*unlearn, "--out", str(locked), "--overwrite"], "another run"),
        "out-locked-resume": Hostile([*unlearn, "--out", str(locked), "--resume"], "another run"),
        "eval-out-locked": Hostile([*evaluate, "--out", str(locked), "--overwrite"], "another run"),
        "bench-out-locked": Hostile(["bench", "--out", str(locked), "--size", "micro"], "another run"),
        "bench-out-locked-jobs": Hostile(["bench", "--out", str(locked), "--size", "micro", "--jobs", "2", "--grid", "1",
                                          "--no-audit"], "another run"),
        "demo-out-locked": Hostile(["demo", "--out", str(locked)], "another run"),
        "demo-out-locked-other-flags": Hostile(["demo", "--out", str(locked), "--size", "micro", "--config", "gd",
                                                "--redact"], "another run"),
        # faults while writing: the start that failed leaves nothing behind
        "disk-full-at-the-first-checkpoint": Hostile([*unlearn, "--out", out], "no space left",
                                                     fault=fail_for(runstate, "save_file", disk_full)),
        "eval-disk-full": Hostile([*evaluate, "--out", out], "no space left",
                                  fault=fail_for(report, "write_jsonl", disk_full)),
        "out-of-memory-while-loading": Hostile([*unlearn, "--out", out], "out of memory", fault=fail_for(
            recipe, "load_model_and_tokenizer", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried "
                                                             "to allocate 2600000000000 bytes"))),
        "eval-memory-error": Hostile([*evaluate, "--out", out], "out of memory",
                                     fault=fail_for(report, "write_jsonl", MemoryError())),
        "ctrl-c-while-loading": Hostile([*unlearn, "--out", out], "interrupted", code=130,
                                        fault=ctrl_c_at(recipe, "load_model_and_tokenizer")),
        # data that cannot be read or cannot be meant
        "forget-invalid-utf8": data_case("unlearn", files["invalid_utf8.jsonl"], "UTF-8"),
        "forget-gzip-named-jsonl": data_case("unlearn", files["gzip.jsonl"], "gzip"),
        "forget-lone-surrogate": data_case("unlearn", files["surrogate.jsonl"], "surrogate"),
        "eval-forget-invalid-utf8": data_case("eval", files["invalid_utf8.jsonl"], "UTF-8"),
        "level-bad-bytes": Hostile(["level", "--model", model, "--documents", str(files["invalid_utf8.jsonl"])], "UTF-8"),
        "forget-is-retain": data_case("unlearn", Path(forget), "same data", retain_file=forget),
        "forget-shares-a-row-with-retain": data_case("unlearn", Path(forget), "share 1 row",
                                                     retain_file=str(files["shares_a_row.jsonl"])),
        "documents-shared": data_case("unlearn", files["docs.jsonl"], "share 1 document",
                                      retain_file=str(files["docs_again.jsonl"])),
        "eval-forget-is-retain": data_case("eval", Path(forget), "same data", retain_file=forget),
        "every-answer-empty": data_case("unlearn", files["no_answers.jsonl"], "every answer"),
        "row-longer-than-the-context": Hostile(["unlearn", "--model", model, "--forget", str(files["long_row.jsonl"]),
                                                "--retain", retain, "--config", "demo", "--out", out], "max_length"),
        # models that cannot be what they claim
        "model-corrupt-config-json": Hostile(on(files["corrupt_config"]), "config.json"),
        "model-truncated-safetensors": Hostile(on(files["truncated"]), "damaged"),
        "eval-model-truncated-safetensors": Hostile(["eval", "--model", str(files["truncated"]), *rows, "--out", out],
                                                    "damaged"),
        "model-missing-layer-weights": Hostile(on(files["missing_layer"]), "lacks"),
        "model-embedding-smaller-than-tokenizer": Hostile(on(files["small_embedding"]), "embedding"),
        "model-needs-remote-code": Hostile(on(files["remote_code"]), "remote code"),
        "level-corrupt-config-json": Hostile(["level", "--model", str(files["corrupt_config"]), "--documents", forget],
                                             "config.json"),
        # settings no run can mean
        "lr-nan": setting("optim.lr=.nan", "finite"),
        "lr-infinite": setting("optim.lr=.inf", "finite"),
        "lr-1e400": setting("optim.lr=1e400", "finite"),
        "dropout-nan": setting("lora.dropout=.nan", "finite"),
        "guard-infinite": setting("guard.max_forget_loss=.inf", "finite"),
        "time-budget-nan": setting("optim.time_budget_s=.nan", "finite"),
        "seed-negative": setting("seed=-1", "seed"),
        "seed-beyond-32-bits": setting("seed=4294967296", "seed"),
        "config-path-missing": Hostile([*unlearn[:-4], "--config", "/no/such/dir/gd.yaml", "--out", out], "no such file"),
        "config-binary": Hostile([*unlearn[:-4], "--config", str(files["binary.yaml"]), "--out", out], "YAML"),
        "config-is-a-directory": Hostile([*unlearn[:-4], "--config", str(files["config_dir"]), "--out", out], "config"),
        # a checkpoint that cannot be resumed as asked
        "resume-damaged-checkpoint": Hostile([*unlearn, "--out", str(scratch / "damaged"), "--resume"], "damaged"),
        "resume-with-other-settings": Hostile([*unlearn, "--out", str(scratch / "other-settings"), "--resume"],
                                              "optim.lr"),
        "resume-with-other-data": Hostile([*unlearn, "--out", str(scratch / "other-data"), "--resume"], "forget data"),
    }


def hostile_scratch(root: Path, made_from: dict) -> None:
    """What a user keeps around the outputs: their working directory, home, a folder of their own,
    a locked output, a link loop, and interrupted runs: one whose checkpoint is damaged, two made
    from other settings or data than ``made_from`` (what the table's unlearn command is made from)."""
    for place in ("work", "home", "foreign", "read-only"):
        (root / place).mkdir()
        (root / place / "notes.txt").write_text(f"{place}: keep me")
    (root / "loop").symlink_to(root / "loop")
    other_settings = {**made_from, "config": {**made_from["config"], "optim": {**made_from["config"]["optim"], "lr": 0.5}}}
    for name, position in (("damaged", "{"), ("other-settings", json.dumps({"made_from": other_settings})),
                           ("other-data", json.dumps({"made_from": {**made_from, "forget_sha256": "0" * 64}}))):
        state = root / f".{name}.partial" / "state"
        state.mkdir(parents=True)
        for file, text in (("trainable.safetensors", "not weights"), ("optimizer.pt", "x"), ("position.json", position),
                           ("complete", "")):
            (state / file).write_text(text)


def test_every_hostile_input_or_fault_is_one_line_and_loses_nothing(micro_model_dir, micro_data_dir, hostile_files,
                                                                   tmp_path, capfd, monkeypatch):
    from unlearnlm.data.records import content_sha256
    from unlearnlm.paths import lock_path_for
    from unlearnlm.runstate import run_identity

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    forget, retain = micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl"
    hostile_scratch(scratch, run_identity(load_config("demo", ["max_length=32"]).to_dict(), str(micro_model_dir),
                                          content_sha256(forget), content_sha256(retain)))
    monkeypatch.chdir(scratch / "work")
    monkeypatch.setenv("HOME", str(scratch / "home"))
    monkeypatch.setenv("UNLEARNLM_CACHE", str(tmp_path / "cache"))
    inputs = {path: tree_digest(path) for path in (micro_model_dir, micro_data_dir, hostile_files["docs.jsonl"].parent)}
    # Another run holds the lock of scratch/locked (an flock on its lock file, as lock_output takes it).
    holder = os.open(lock_path_for(scratch / "locked"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"4242\n")
    before = tree_digest(scratch)
    table = hostile_cases(str(micro_model_dir), micro_data_dir, hostile_files, scratch)
    assert len(table) >= 40
    failures = []
    try:
        for name, case in table.items():
            with pytest.MonkeyPatch.context() as patch:
                if case.fault:
                    case.fault(patch)
                code, lines = cli_lines(case.argv, capfd)
            after = tree_digest(scratch)
            changed = sorted(set(before.items()) ^ set(after.items()))
            if (code != case.code or len(lines) != 1 or not lines[0].startswith("error: ")
                    or case.says.lower() not in lines[0].lower() or changed or (tmp_path / "cache").exists()):
                failures.append(f"{name}: exit {code}, stderr {lines[-3:]}, changed {[c[0] for c in changed][:3]}")
    finally:
        os.close(holder)
    assert not failures, f"{len(failures)} of {len(table)} cases failed:\n" + "\n".join(failures)
    assert {path: tree_digest(path) for path in inputs} == inputs


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
        code, lines = cli_lines([*argv, *(["--overwrite"] if overwrite else [])], capfd)
        assert code == 2 and len(lines) == 1 and "overlaps the input" in lines[0], (name, lines)
        assert tree_digest(nest) == before, name
    assert sorted(p.name for p in nest.parent.iterdir()) == ["D"]  # no partial or staging directory either


def test_the_demo_refuses_an_output_that_holds_the_model_cache(tmp_path, capfd, monkeypatch):
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    (cache / "keep").write_text("x")
    monkeypatch.setenv("UNLEARNLM_CACHE", str(cache))
    code, lines = cli_lines(["demo", "--out", str(tmp_path / "work")], capfd)
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


def unlearn_in_process(model_dir: Path, data_dir: Path, out: Path, resume: bool = False, extra: tuple = ()) -> dict:
    config = load_config(None, [*KILL_SETTINGS, *extra])
    return unlearn(model_dir, data_dir / "forget.jsonl", data_dir / "retain.jsonl", out, config,
                   resume=resume, show_progress=False)


def unlearn_command(model_dir: Path, data_dir: Path, out: Path, extra: tuple = ()) -> list[str]:
    overrides = [arg for setting in [*KILL_SETTINGS, *extra] for arg in ("--set", setting)]
    return [sys.executable, "-m", "unlearnlm", "unlearn", "--model", str(model_dir), "--forget",
            str(data_dir / "forget.jsonl"), "--retain", str(data_dir / "retain.jsonl"), "--out", str(out), *overrides]


def subprocess_env(**extra: str) -> dict:
    # The same thread count as this process, so that both sides sum in the same order.
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "CUDA_VISIBLE_DEVICES": "", **extra}


def start_paused_run(model_dir: Path, data_dir: Path, out: Path, stage: str, signal_file: Path,
                     pause_at: str = "", extra: tuple = ()) -> subprocess.Popen:
    env = subprocess_env(UNLEARNLM_TEST_PAUSE_AT=pause_at or f"{stage}:{SECOND_CHECKPOINT}",
                         UNLEARNLM_TEST_PAUSE_FILE=str(signal_file))
    return subprocess.Popen(unlearn_command(model_dir, data_dir, out, extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


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


def same_weights(a: Path, b: Path) -> bool:
    first, second = (load_file(str(directory / "model.safetensors")) for directory in (a, b))
    return sorted(first) == sorted(second) and all(torch.equal(first[name], second[name]) for name in first)


# Steps: 3 chunks of 8 steps. A stop inside the first chunk, at a chunk's end, inside the second chunk.
MAX_STEPS = (3, 8, 10)


@pytest.mark.slow
def test_a_kill_during_the_final_save_resumes_to_the_uninterrupted_model(micro_model_dir, micro_data_dir, tmp_path):
    """The checkpoint written after a max_steps stop once pointed at the next chunk: the resumed run
    trained one step more than asked (11 for max_steps=10) and ended with other weights."""
    runs = {steps: start_paused_run(micro_model_dir, micro_data_dir, tmp_path / f"killed{steps}", "saving",
                                    tmp_path / f"{steps}.paused", pause_at="saving:1", extra=(f"optim.max_steps={steps}",))
            for steps in MAX_STEPS}
    for steps, process in runs.items():
        kill_when_paused(process, tmp_path / f"{steps}.paused")
    for steps in MAX_STEPS:
        extra = (f"optim.max_steps={steps}",)
        straight = unlearn_in_process(micro_model_dir, micro_data_dir, tmp_path / f"straight{steps}", extra=extra)
        resumed = unlearn_in_process(micro_model_dir, micro_data_dir, tmp_path / f"killed{steps}", resume=True,
                                     extra=extra)
        assert resumed["steps"] == straight["steps"] == steps
        assert resumed["stopped_reason"] == straight["stopped_reason"]
        assert same_weights(tmp_path / f"straight{steps}", tmp_path / f"killed{steps}"), steps
        assert log_losses(tmp_path / f"killed{steps}") == log_losses(tmp_path / f"straight{steps}"), steps


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_and_the_first_one_survives(micro_model_dir, micro_data_dir,
                                                                             tmp_path):
    out = tmp_path / "out"
    first = start_paused_run(micro_model_dir, micro_data_dir, out, "written", tmp_path / "paused")
    deadline = time.monotonic() + 300
    while not (tmp_path / "paused").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never reached its pause"
        time.sleep(0.2)
    partial = tmp_path / ".out.partial"
    before = tree_digest(partial)
    for flags in ([], ["--overwrite"], ["--resume"]):
        second = subprocess.run([*unlearn_command(micro_model_dir, micro_data_dir, out), *flags], env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1 and "another run" in lines[0], (flags, lines)
        assert f"process {first.pid}" in lines[0]
    assert tree_digest(partial) == before  # the first run's checkpoint and log are untouched
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The killed run's lock file names a dead process: a resume takes it over and finishes the run.
    unlearn_in_process(micro_model_dir, micro_data_dir, out, resume=True)
    unlearn_in_process(micro_model_dir, micro_data_dir, tmp_path / "straight")
    assert same_weights(out, tmp_path / "straight")
    assert log_losses(out) == log_losses(tmp_path / "straight")
    assert not (tmp_path / ".out.lock").exists()


def test_ctrl_c_says_how_to_resume_and_the_resumed_run_is_the_uninterrupted_one(micro_model_dir, micro_data_dir,
                                                                              tmp_path, capfd, monkeypatch):
    from unlearnlm.engine import Engine

    straight = tmp_path / "straight"
    unlearn_in_process(micro_model_dir, micro_data_dir, straight)
    command = unlearn_command(micro_model_dir, micro_data_dir, tmp_path / "out")[3:]
    steps = {"count": 0}
    original = Engine._optimizer_step

    def interrupted_at_step_ten(self, group):
        steps["count"] += 1
        if steps["count"] == 10:  # inside the second chunk: its checkpoint is the first chunk's end
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, group)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "_optimizer_step", interrupted_at_step_ten)
        code, lines = cli_lines(command, capfd)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted") and "--resume" in lines[0]
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    code, lines = cli_lines([*command, "--resume"], capfd)
    assert code == 0
    assert same_weights(tmp_path / "out", straight)
    assert log_losses(tmp_path / "out") == log_losses(straight)


def test_a_failure_after_training_keeps_the_model_and_resume_publishes_it(micro_model_dir, micro_data_dir, tmp_path,
                                                                          capfd, monkeypatch):
    from unlearnlm import recipe

    command = unlearn_command(micro_model_dir, micro_data_dir, tmp_path / "out", ("optim.max_steps=3",))[3:]
    busy = OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(tmp_path / "out"))
    with pytest.MonkeyPatch.context() as patch:
        fail_for(recipe, "finalize_output", busy)(patch)  # the rename into place fails: a busy mount point
        code, lines = cli_lines(command, capfd)
    assert code == 2 and len(lines) == 1 and "busy" in lines[0] and "finished model" in lines[0] and "--resume" in lines[0]
    partial = tmp_path / ".out.partial"
    assert (partial / "run.json").is_file() and (partial / "model.safetensors").is_file()
    code, lines = cli_lines([*command, "--resume"], capfd)
    assert code == 0 and not partial.exists()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["steps"] == 3
    unlearn_in_process(micro_model_dir, micro_data_dir, tmp_path / "straight", extra=("optim.max_steps=3",))
    assert same_weights(tmp_path / "out", tmp_path / "straight")
