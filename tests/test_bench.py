"""`unlearnlm bench` end to end on the micro preset: one method, one grid point, every output written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearnlm.bench import BenchOptions, run_bench, summarize
from unlearnlm.bench_report import goal_checks
from unlearnlm.errors import UserError

SCORE_KEYS = ("final", "task_aggregate", "mia_score", "utility")


@pytest.fixture(scope="module")
def bench_out(micro_target, tmp_path_factory) -> Path:
    _, cache = micro_target
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNLEARNLM_CACHE", str(cache))
        run_bench(BenchOptions(out=out, size="micro", methods=["sugd-lora", "gd"], grid=[1.0], seeds=[0]))
    return out


@pytest.mark.slow  # every unlearning run is a process of its own
def test_results_hold_every_run_with_its_scores_and_costs(bench_out: Path) -> None:
    results = json.loads((bench_out / "results.json").read_text())
    assert [entry["method"] for entry in results["tuning"]] == ["sugd-lora", "gd"]
    assert [entry["method"] for entry in results["reported"]] == ["sugd-lora", "gd"]
    for entry in results["tuning"] + results["reported"]:
        assert all(0.0 <= entry["scores"][key] <= 1.0 for key in SCORE_KEYS)
        assert len(entry["scores"]["terms"]) == 12
        assert entry["wall_seconds"] > 0 and entry["peak_rss_mb"] > 0 and entry["trainable_parameters"] > 0
    lora, full = (entry["trainable_parameters"] for entry in results["reported"])
    assert lora < full / 10
    # Tuning and reporting used different targets (draws 1 and 0); the oracle is the reported draw's.
    assert results["targets"]["0"] != results["targets"]["1"]
    assert results["oracle"] == str(Path(results["targets"]["0"]) / "oracle")
    oracle = results["oracle_scores"]["final"]
    assert {row["method"] for row in results["summary"]} == {"sugd-lora", "gd"}
    for row in results["summary"]:
        low, high = row["final_interval"]
        assert low <= row["final"] <= high and row["of_oracle"] == pytest.approx(row["final"] / oracle)


@pytest.mark.slow  # every unlearning run is a process of its own
def test_sugd_run_logs_its_trajectory_chunk_by_chunk(bench_out: Path) -> None:
    results = json.loads((bench_out / "results.json").read_text())
    sugd = results["reported"][0]
    chunks = [point["chunk"] for point in sugd["trajectory"]]
    assert chunks == list(range(1, len(chunks) + 1)) and len(chunks) >= 1
    assert all("final" in point for point in sugd["trajectory"])
    assert results["reported"][1]["trajectory"] == []


@pytest.mark.slow  # every unlearning run is a process of its own
def test_report_and_plots_are_written(bench_out: Path) -> None:
    report = (bench_out / "report.md").read_text()
    for name in ("scores.png", "final_vs_time.png", "sugd_trajectory.png"):
        assert (bench_out / name).stat().st_size > 5000
        assert f"]({name})" in report
    assert "## Goals" in report and "SUGD beats every other method" in report
    assert "| oracle (retrained without F) |" in report and "of oracle" in report


def test_summary_gives_mean_and_spread_over_seeds(monkeypatch) -> None:
    import unlearnlm.evaluation.bootstrap as bootstrap

    monkeypatch.setattr(bootstrap, "final_interval", lambda runs: (0.0, 1.0))  # tested in test_bootstrap
    entries = [{"method": "gd", "seed": seed, "scores": {"final": final, "task_aggregate": 0.5, "mia_score": 0.0,
                                                        "mia_auc": 1.0, "utility": 1.0, "bootstrap": {}},
                "wall_seconds": 2.0, "peak_rss_mb": 100.0, "trainable_parameters": 10} for seed, final in enumerate((0.4, 0.6))]
    (row,) = summarize({"reported": entries, "oracle_scores": {"final": 0.8}})
    assert row["seeds"] == 2 and row["final"] == pytest.approx(0.5) and row["final_std"] == pytest.approx(0.1)
    assert row["of_oracle"] == pytest.approx(0.5 / 0.8)


def test_goal_checks_say_when_a_goal_is_missed() -> None:
    def row(method, final, utility, seconds):
        return {"method": method, "final": final, "utility": utility, "wall_seconds": seconds}

    results = {"target_scores": {"0": {"utility": 1.0}}, "oracle_scores": {"final": 0.7},
               "summary": [row("sugd-lora", 0.6, 0.95, 10.0), row("gd", 0.7, 0.5, 5.0)]}
    verdicts = {goal: met for goal, _, met in goal_checks(results)}
    assert verdicts["SUGD beats every other method on the final score"] == "**no**"
    assert verdicts["utility at least 90% of the target's"] == "yes"
    # 0.6 / 0.7 = 0.857 < 0.9.
    assert verdicts["SUGD's final at least 0.9 of the oracle's"] == "**no**"
    assert verdicts["SUGD unlearning time at most gd's (same passes over the forget set)"] == "**no**"


def test_unknown_method_is_a_user_error(micro_target, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))
    with pytest.raises(UserError, match="unknown bench method 'nope'"):
        run_bench(BenchOptions(out=tmp_path, size="micro", methods=["nope"]))


@pytest.mark.slow  # every unlearning run is a process of its own
def test_a_rerun_reuses_finished_runs(bench_out: Path, micro_target, monkeypatch) -> None:
    first = json.loads((bench_out / "results.json").read_text())
    records = sorted((bench_out / "runs").glob("*.done.json"))
    assert len(records) == 4
    stamps = [record.stat().st_mtime_ns for record in records]
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))
    again = run_bench(BenchOptions(out=bench_out, size="micro", methods=["sugd-lora", "gd"], grid=[1.0], seeds=[0]))
    assert [record.stat().st_mtime_ns for record in records] == stamps
    assert [e["scores"] for e in again["reported"]] == [e["scores"] for e in first["reported"]]


@pytest.mark.parametrize("flags", [["--grid", "1,-2"], ["--seeds", "a"], ["--size", "huge", "--method", "gd"]])
def test_bad_bench_flags_are_one_line_and_exit_code_2(flags, tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "unlearnlm", "bench", "--out", str(tmp_path / "out"), *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_whole_document_rows_put_the_forget_loss_on_the_whole_text(tmp_path: Path) -> None:
    from unlearnlm.bench import whole_document_rows
    from unlearnlm.data.records import load_records, write_jsonl

    rows = [{"id": "42sc1", "input": "Ada Lovelace was an English", "output": "mathematician.", "task": "Task3", "split": "forget"},
            {"id": "42qa0", "input": "Who was Ada?", "output": "A mathematician", "task": "Task3", "split": "forget"}]
    write_jsonl(rows, tmp_path / "forget.jsonl")
    sc, qa = load_records(whole_document_rows(tmp_path / "forget.jsonl", tmp_path / "whole.jsonl"), "forget")
    assert (sc.id, sc.input, sc.output) == ("42sc1", "Ada", "Lovelace was an English mathematician.")
    assert (qa.input, qa.output) == ("Who was Ada?", "A mathematician")
