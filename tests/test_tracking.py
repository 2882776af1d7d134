"""Trackers: what TensorBoard shows is what unlearn_log.jsonl holds."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_tensorboard_scalars_equal_the_jsonl_log(micro_model_dir, micro_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    forget, retain = micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl"
    assert run_cli("unlearn", "--model", micro_model_dir, "--forget", forget, "--retain", retain, "--out", out,
                   "--config", "demo", "--val-forget", forget, "--val-retain", retain,
                   *[arg for setting in ("optim.max_steps=3", "max_length=32", "validation.every_steps=2",
                                         "validation.metric=task_aggregate", "validation.max_new_tokens=4",
                                         "tracking.report_to=tensorboard")
                     for arg in ("--set", setting)]) == 0
    rows = [json.loads(line) for line in (out / "unlearn_log.jsonl").read_text().splitlines()]
    expected = {}  # (tag, step) -> value, written here from the rows, not by unlearnlm.tracking
    for row in rows:
        group = "validation" if row.get("event") == "validation" else "train"
        for name, value in row.items():
            if name not in ("step", "chunk", "epoch", "event", "phase") and isinstance(value, (int, float)):
                expected[f"{group}/{name}", row["step"]] = value
    assert any(tag == "validation/task_aggregate" for tag, _ in expected)
    assert sum(tag == "train/loss" for tag, _ in expected) == 3

    events = EventAccumulator(str(out / "tensorboard" / "unlearnlm"))
    events.Reload()
    logged = {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    assert sorted(logged) == sorted(expected)
    for key, value in expected.items():  # TensorBoard keeps 32-bit floats
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_a_tracker_whose_package_is_missing_fails_before_loading(micro_model_dir, micro_data_dir, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code = run_cli("unlearn", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl",
                   "--retain", micro_data_dir / "retain.jsonl", "--out", tmp_path / "out", "--set", "tracking.report_to=wandb")
    assert code == 2 and "needs the wandb package" in capsys.readouterr().err
