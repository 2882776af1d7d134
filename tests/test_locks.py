"""One writer per output: every command that writes holds its output's lock while it runs (bench
and demo too, taken once by the command, not by bench's workers), drops it when it ends, and eval
locks an output whose parent directory does not exist yet. The refusals of a second run are cases
of tests/test_safety.py's hostile table."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from conftest import cli_lines

from unlearnlm.errors import UserError
from unlearnlm.paths import lock_path_for


def held_by_this_process(out: Path) -> bool:
    """The lock file beside ``out`` names this process and another open of it cannot take the lock
    (an ``flock`` conflicts across open files, also within one process)."""
    path = lock_path_for(out)
    if not path.exists() or path.read_text() != f"{os.getpid()}\n":
        return False
    other = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(other)
    return False


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_bench_and_demo_hold_the_lock_while_they_run_and_a_rerun_takes_it_again(command, tmp_path, capfd,
                                                                                 monkeypatch):
    from unlearnlm import demo
    from unlearnlm.bench import run

    out = tmp_path / "out"
    seen = []
    monkeypatch.setenv("UNLEARNLM_CACHE", str(tmp_path / "cache"))
    # The command's work is replaced by a look at the lock: no target is built, nothing is run.
    monkeypatch.setattr(run, "run_bench", lambda options: seen.append(held_by_this_process(options.out)))
    monkeypatch.setattr(demo, "run_demo", lambda place, **options: seen.append(held_by_this_process(place)))
    argv = [command, "--out", out, "--size", "micro", *(["--jobs", "2"] if command == "bench" else [])]
    for _ in range(2):  # the second run is the rerun that resumes a bench: the first one's lock is gone
        code, lines = cli_lines(argv, capfd)
        assert code == 0 and lines == []
        assert not lock_path_for(out).exists()
    assert seen == [True, True]


def test_eval_locks_an_output_whose_parent_does_not_exist_yet_and_a_failure_leaves_nothing(
        micro_model_dir, micro_data_dir, tmp_path, capfd, monkeypatch):
    from unlearnlm.evaluation import evaluator

    out = tmp_path / "new" / "deeper" / "out"
    seen = []

    def look_then_fail(*args, **kwargs):
        seen.append(held_by_this_process(out))
        raise UserError("stopped by the test")

    monkeypatch.setattr(evaluator, "evaluate_paths", look_then_fail)
    code, lines = cli_lines(["eval", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl",
                             "--retain", micro_data_dir / "retain.jsonl", "--out", out], capfd)
    assert code == 2 and lines == ["error: stopped by the test"]
    assert seen == [True]
    # The parents made for the lock held nothing else: released, they are gone with it.
    assert sorted(path.name for path in tmp_path.iterdir()) == []
