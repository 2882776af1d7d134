"""`unlearnlm bench` end to end on the micro preset: one method, one grid point, every output written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from unlearnlm.bench.report import auto_section, goal_checks, plot_trajectory
from unlearnlm.bench.run import BenchOptions, run_bench
from unlearnlm.bench.statistics import summarize
from unlearnlm.errors import UserError

SCORE_KEYS = ("final", "task_aggregate", "mia_score", "utility")


@pytest.fixture(scope="module")
def bench_out(micro_target, tmp_path_factory) -> Path:
    _, cache = micro_target
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNLEARNLM_CACHE", str(cache))
        # The audit stage has its own test below (audit_one itself: tests/test_audit.py).
        run_bench(BenchOptions(out=out, size="micro", methods=["sugd", "gd"], grid=[1.0], seeds=[0], audit=False, draws=1))
    return out


@pytest.mark.slow  # every unlearning run is a process of its own
def test_results_hold_every_run_with_its_scores_and_costs(bench_out: Path) -> None:
    results = json.loads((bench_out / "results.json").read_text())
    # One learning rate: nothing to choose, so no tuning run and no tuning draw (tuning: the next test).
    assert results["tuning"] == [] and list(results["targets"]) == ["0"]
    assert [entry["method"] for entry in results["reported"]] == ["sugd", "gd"]
    assert [entry["lr_multiplier"] for entry in results["reported"]] == [1.0, 1.0]
    for entry in results["reported"]:
        assert all(0.0 <= entry["scores"][key] <= 1.0 for key in SCORE_KEYS)
        assert len(entry["scores"]["terms"]) == 12
        assert entry["wall_seconds"] > 0 and entry["peak_rss_mb"] > 0 and entry["trainable_parameters"] > 0
    # Both train every weight: the count is the target's, read from its weights file.
    with safe_open(Path(results["targets"]["0"]) / "model.safetensors", "pt") as weights:
        in_file = sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())
    assert [entry["trainable_parameters"] for entry in results["reported"]] == [in_file, in_file]
    assert results["draws"] == [{"seed": 0, "draw": 0, "target": results["targets"]["0"],
                                 "oracle": str(Path(results["targets"]["0"]) / "oracle")}]
    oracle = results["oracle_scores"][0]["final"]
    assert {row["method"] for row in results["summary"]} == {"sugd", "gd"}
    final = results["statistics"]["final"]["by_name"]
    for row in results["summary"]:
        low, high = row["final_interval"]
        assert low <= row["final"] <= high and row["of_oracle"]["share"] == pytest.approx(row["final"] / oracle)
        (entry,) = [entry for entry in results["reported"] if entry["method"] == row["method"]]
        assert final[row["method"]]["finals_by_draw"] == [entry["scores"]["final"]]
    # The oracle against the best method (gd here) and against sugd, the authors' recipe, which ran.
    assert final["oracle"]["finals_by_draw"] == [oracle] and set(final["oracle"]["paired"]) == {"best", "sugd"}


@pytest.mark.slow  # every unlearning run is a process of its own
def test_each_method_is_reported_at_the_rate_its_tuning_runs_scored_best(micro_target, tmp_path: Path, monkeypatch) -> None:
    import unlearnlm.bench.run as bench_run

    # The tuning draw is the reported one here, so that the test builds no second target: what is
    # tested is the choice among the tuning runs (that draws differ: tests/test_sets.py).
    monkeypatch.setattr(bench_run, "TUNE_DRAW", bench_run.REPORT_DRAW)
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))
    results = run_bench(BenchOptions(out=tmp_path, size="micro", methods=["gd"], grid=[0.25, 4.0], seeds=[0], audit=False,
                                     draws=1))
    tried = {run["lr_multiplier"]: run["scores"]["final"] for run in results["tuning"]}
    assert [run["overrides"][-1] for run in results["tuning"]] == ["optim.lr=0.00025", "optim.lr=0.004"]
    (reported,) = results["reported"]
    assert sorted(tried) == [0.25, 4.0] and tried[reported["lr_multiplier"]] == max(tried.values())
    assert f"optim.lr={0.001 * reported['lr_multiplier']}" in reported["overrides"]


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
    for name in ("finals_by_draw.png", "scores.png", "final_vs_time.png", "sugd_trajectory.png"):
        assert (bench_out / name).stat().st_size > 5000
        assert f"]({name})" in report
    assert "## Goals" in report and "a SUGD variant first" in report
    assert "| oracle (retrained without F) |" in report and "of oracle [95% CI]" in report and "| tie group |" in report


def test_summary_gives_means_over_runs_and_the_verdicts_over_draws() -> None:
    entries = [{"method": "gd", "draw": draw, "seed": 0, "scores": {"final": final, "task_aggregate": 0.5, "mia_score": 0.0,
                                                                  "mia_auc": 1.0, "utility": 1.0},
                "wall_seconds": 2.0 + draw, "peak_rss_mb": 100.0, "trainable_parameters": 10}
               for draw, final in enumerate((0.4, 0.6))]
    verdict = {"mean": 0.5, "interval": [0.3, 0.7], "of_oracle": {"share": 0.625, "interval": [0.5, 0.7]}}
    (row,) = summarize({"reported": entries, "statistics": {"final": {"by_name": {"gd": verdict}}}})
    assert row["runs"] == 2 and row["wall_seconds"] == pytest.approx(2.5) and row["task_aggregate"] == 0.5
    assert (row["final"], row["final_interval"], row["of_oracle"]) == (0.5, [0.3, 0.7], verdict["of_oracle"])
    assert row["robust_final"] is None


def test_goal_checks_say_when_a_goal_is_missed() -> None:
    def row(method, final, utility, seconds):
        return {"method": method, "final": final, "utility": utility, "wall_seconds": seconds}

    # gd is first, and sugd-lora's interval against it holds 0: the SUGD family is not first.
    final = {"best": "gd", "by_name": {"oracle": {"mean": 0.7}, "gd": {"paired": {}},
                                       "sugd-lora": {"paired": {"best": {"interval": [-0.2, 0.1]}}}}}
    results = {"draws": [{}], "target_scores": {"0": {"utility": 1.0}}, "oracle_scores": [{"final": 0.7, "utility": 1.0}],
               "statistics": {"final": final}, "summary": [row("sugd-lora", 0.6, 0.95, 10.0), row("gd", 0.7, 0.5, 5.0)]}
    verdicts = {goal: met for goal, _, met in goal_checks(results)}
    assert verdicts["a SUGD variant first, every other method behind it (paired 95% interval below 0)"] == "**no**"
    assert verdicts["utility at least 90% of the target's"] == "yes"
    # 0.6 / 0.7 = 0.857 < 0.9.
    assert verdicts["the best SUGD variant's mean final at least 0.9 of the oracle's"] == "**no**"
    assert verdicts["SUGD unlearning time at most gd's (same passes over the forget set)"] == "**no**"
    # auto is sugd-level calibrated on the target: first, and gd resolved behind it, the family is first.
    final = {"best": "auto", "by_name": {"oracle": {"mean": 0.7}, "auto": {"paired": {}},
                                         "gd": {"paired": {"best": {"interval": [-0.2, -0.1]}}}}}
    results.update(statistics={"final": final}, summary=[row("auto", 0.69, 1.0, 10.0), row("gd", 0.5, 1.0, 5.0)])
    verdicts = {goal: met for goal, _, met in goal_checks(results)}
    assert verdicts["a SUGD variant first, every other method behind it (paired 95% interval below 0)"] == "yes"


def test_auto_section_reads_agreement_and_cost_draw_by_draw() -> None:
    def run(method, draw, final, seconds, auc=0.9, forgotten=None, auto_seconds=None):
        entry = {"method": method, "draw": draw, "seed": 0, "wall_seconds": seconds,
                 "scores": {"final": final, "mia_auc": auc}}
        if forgotten is not None:
            entry.update(verdict={"forgotten": forgotten}, auto_seconds=auto_seconds)
        return entry

    # Draw 0: "forgotten" and the evaluation's AUC 0.60 lies in 0.5 +- 0.15: agree. Draw 1: "forgotten" but
    # AUC 0.70: disagree. Costs 30/10 = 3x and 20/20 = 1x: mean 2x, which the goal allows.
    reported = [run("auto", 0, 0.8, 12.0, 0.60, True, 30.0), run("sugd-level", 0, 0.7, 10.0),
                run("auto", 1, 0.6, 8.0, 0.70, True, 20.0), run("sugd-level", 1, 0.5, 20.0)]
    by_name = {"auto": {"mean": 0.7, "spread": 0.14}, "sugd-level": {"mean": 0.6, "spread": 0.14},
               "oracle": {"mean": 0.75}}
    results = {"options": {"seeds": [0]}, "reported": reported, "oracle_scores": [{"final": 0.8}, {"final": 0.7}],
               "statistics": {"final": {"by_name": by_name}}}
    text = "\n".join(auto_section(results))
    assert "| 0 | 0.800 | 0.800 | 100% | sugd-level 0.700 | forgotten | 0.600 | yes | 30 | 10 | 3.00x |" in text
    assert "| 1 | 0.600 | 0.700 | 86% | sugd-level 0.500 | forgotten | 0.700 | **no** | 20 | 20 | 1.00x |" in text
    # 0.7 >= 0.9 x 0.75 = 0.675: met; 0.7 >= sugd-level's 0.6: met; 1 of 2 agree < 80%: not met.
    assert "| auto's mean final at least 0.9 of the oracle's | 0.700 = 93.3% of 0.750 | yes |" in text
    assert "| auto's mean final at least the best tuned method's | 0.700 against sugd-level 0.600 | yes |" in text
    assert "| the verdict agrees with the evaluation's MIA on at least 80% of draws | 1 of 2 | **no** |" in text
    assert "| cost at most 2x one sugd-level run | 2.00x (mean over draws; 1.00x-3.00x) | yes |" in text
    assert auto_section({**results, "reported": reported[1::2]}) == []  # no auto run: no section


def test_the_trajectory_plot_leaves_out_runs_whose_log_holds_other_figures(tmp_path: Path) -> None:
    """auto's held-out checks are logged as validations too, with none of the plotted scores: a report
    holding only such a run has no trajectory plot (it raised in matplotlib before)."""
    results = {"reported": [{"method": "auto", "trajectory": [{"chunk": 1, "forget_loss": 3.0, "mia_auc": 0.6}]}]}
    assert plot_trajectory(results, tmp_path / "trajectory.png") is None
    assert not (tmp_path / "trajectory.png").exists()


def test_unknown_method_is_a_user_error(micro_target, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))
    with pytest.raises(UserError, match="unknown bench method 'nope'"):
        run_bench(BenchOptions(out=tmp_path, size="micro", methods=["nope"]))


@pytest.mark.slow  # every unlearning run is a process of its own
def test_a_rerun_reuses_finished_runs(bench_out: Path, micro_target, monkeypatch) -> None:
    first = json.loads((bench_out / "results.json").read_text())
    records = sorted((bench_out / "runs").glob("*.done.json"))
    assert len(records) == 2
    stamps = [record.stat().st_mtime_ns for record in records]
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))
    again = run_bench(BenchOptions(out=bench_out, size="micro", methods=["sugd", "gd"], grid=[1.0], seeds=[0], audit=False,
                                   draws=1))
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


def test_forget_level_reads_pool_text_outside_every_set(micro_target, monkeypatch) -> None:
    import unlearnlm.evaluation.mia as mia
    from unlearnlm.bench.scoring import LEVEL_DOCUMENTS, forget_level
    from unlearnlm.evaluation.likelihood import TokenStats

    target, _ = micro_target
    sets = target / "benchmark"
    in_sets = {json.loads(line).get("document") for name in ("mia_members.jsonl", "mia_nonmembers.jsonl")
               for line in (sets / name).read_text().splitlines()}
    in_sets |= {row["input"] + " " + row["output"] for name in ("forget.jsonl", "retain.jsonl", "general.jsonl")
                for row in map(json.loads, (sets / name).read_text().splitlines())}
    seen: list[str] = []

    def fake_statistics(model, tokenizer, documents, *args, **kwargs):
        seen.extend(documents)
        # Document i costs i + 1 nats per token, so the level is the mean of 1..n.
        return [TokenStats(-np.full(3, float(index + 1))) for index in range(len(documents))]

    monkeypatch.setattr(mia, "document_statistics", fake_statistics)
    level = forget_level(target, batch_size=4)
    assert len(seen) == LEVEL_DOCUMENTS and not in_sets & set(seen)
    assert level == pytest.approx((LEVEL_DOCUMENTS + 1) / 2)


def test_settle_runs_from_the_first_model_at_that_models_level(tmp_path: Path, monkeypatch) -> None:
    import unlearnlm.bench.run as bench_run

    runs: list[tuple] = []

    def fake_unlearn(model, forget, retain, out, overrides, log):
        runs.append((model, retain, out, list(overrides)))
        return {"steps": 10 * len(runs), "wall_seconds": 1.5 * len(runs), "validation_seconds": 0.0,
                "peak_rss_mb": 100.0 * len(runs), "stopped_reason": "completed", "trainable_parameters": 7}

    levels: list = []
    monkeypatch.setattr(bench_run, "run_unlearn", fake_unlearn)
    monkeypatch.setattr(bench_run, "forget_level",
                        lambda target, batch_size, model=None: levels.append((target, model)) or 3.14159)
    target, forget, run_dir = tmp_path / "target", tmp_path / "forget.jsonl", tmp_path / "runs" / "x-seed0"
    first = ["method=sugd", "optim.lr=0.002", "seed=3", "method_args.forget_ceiling=3.0"]
    record = bench_run.settle_run(target, forget, run_dir, first, ("method=sugd", "schedule.chunk_size=null"), 16)
    first_dir = tmp_path / "runs" / "x-seed0-first"
    retain = target / "benchmark" / "retain.jsonl"  # the target's retain set for both runs
    assert runs[0] == (target, retain, first_dir, first)
    # The second run starts from the first's model, at the level read on that model (not the target's).
    assert levels == [(target, first_dir)]
    assert runs[1] == (first_dir, retain, run_dir, ["method=sugd", "schedule.chunk_size=null", "optim.lr=0.002", "seed=3",
                                            "method_args.forget_target=3.1416"])
    assert record["steps"] == 30 and record["wall_seconds"] == pytest.approx(4.5) and record["peak_rss_mb"] == 200.0
    assert record["first"]["steps"] == 10 and record["settle_level"] == pytest.approx(3.14159)


@pytest.mark.slow  # two unlearning processes
def test_settle_pass_really_unlearns_the_first_model_on_the_targets_sets(micro_target, tmp_path: Path) -> None:
    from unlearnlm.bench.run import settle_run
    from unlearnlm.bench.variants import variants

    target, _ = micro_target
    variant = variants(n_layers=2)["sugd-settle"]
    run_dir = tmp_path / "runs" / "settle-seed0"
    run_dir.parent.mkdir()
    first_rate = [*variant.at_rate(1.0), "schedule.epochs_per_chunk=1", "seed=0", "method_args.forget_ceiling=5.0"]
    record = settle_run(target, target / "benchmark" / "forget.jsonl", run_dir, first_rate, variant.settle, 16)
    first = json.loads((tmp_path / "runs" / "settle-seed0-first" / "run.json").read_text())
    second = json.loads((run_dir / "run.json").read_text())
    assert first["model"] == str(target) and second["model"] == str(tmp_path / "runs" / "settle-seed0-first")
    assert first["data"]["retain"] == second["data"]["retain"] == str(target / "benchmark" / "retain.jsonl")
    assert second["config"]["method_args"]["forget_target"] == pytest.approx(record["settle_level"], abs=1e-4)
    assert second["config"]["schedule"]["chunk_size"] is None
    assert second["config"]["optim"]["lr"] == first["config"]["optim"]["lr"]
    assert record["steps"] == first["steps"] + second["steps"] and second["steps"] > 0


def test_audit_stage_gives_every_method_a_robust_final_and_reuses_it(tmp_path: Path, monkeypatch) -> None:
    import unlearnlm.audit.run as audit_run
    from unlearnlm.bench.report import write_bench_report
    from unlearnlm.bench.run import audit_models

    calls: list[str] = []

    bases: list = []

    def fake_audit_one(path, data, train_half, held_out, settings, log=None, base=None):
        calls.append(str(path))
        bases.append(base)
        plain = {"task_aggregate": 0.8, "mia_score": 0.6, "utility": 1.0, "final": 0.8}
        attacked = {"task_aggregate": 0.5, "mia_score": 0.6, "utility": 1.0, "final": 0.7}
        terms = {"forget Task1 regurgitation": 0.8}
        return {"none": {"scores": plain, "terms": terms, "forget_score": 0.2, "recovery": 0.0, "scored_on": "F"},
                "relearn-full": {"scores": attacked, "terms": {"forget Task1 regurgitation": 0.5},
                                 "forget_score": 0.5, "recovery": 0.3, "scored_on": "V"}}

    monkeypatch.setattr(audit_run, "audit_one", fake_audit_one)
    monkeypatch.setattr(audit_run, "split_documents", lambda rows, seed: ([], []))

    class Data:
        forget: list = []

    runs = tmp_path / "runs"
    runs.mkdir()
    results = {"reported": [{"method": "gd", "draw": 0, "seed": 0}, {"method": "gd", "draw": 0, "seed": 1}]}
    from rich.console import Console

    from unlearnlm.bench.run import Stage

    stage = Stage(BenchOptions(out=tmp_path), {}, {0: Data()}, {}, runs, Console(quiet=True))
    (runs / "gd-d0-seed0.results.json").write_text(json.dumps({"kept": "by the reported scoring"}))
    audits = audit_models(results, tmp_path / "oracle", 0, stage)
    assert calls == [str(tmp_path / "oracle"), str(runs / "gd-d0-seed0")]  # the first seed only
    assert bases == [None, {"kept": "by the reported scoring"}]  # the audit starts from the kept results
    # Robust: the worst term (0.5) alone, MIA and utility unchanged: (0.5 + 0.6 + 1.0) / 3.
    assert audits["gd"]["worst_case"]["final"] == pytest.approx((0.5 + 0.6 + 1.0) / 3)
    assert audits["gd"]["attacks"]["relearn-full"]["recovery"] == pytest.approx(0.3)
    assert audit_models(results, tmp_path / "oracle", 0, stage) == audits
    assert len(calls) == 2  # the second call read the records

    robust = {"mean": (0.5 + 0.6 + 1.0) / 3}
    entry = {"method": "gd", "draw": 0, "seed": 0, "scores": {"final": 0.8, "task_aggregate": 0.8, "mia_score": 0.6,
                                                              "mia_auc": 0.3, "utility": 1.0, "terms": {"t": 1.0}},
             "wall_seconds": 1.0, "peak_rss_mb": 10.0, "trainable_parameters": 5}
    scores = {"final": 0.9, "task_aggregate": 0.9, "mia_score": 0.9, "mia_auc": 0.5, "utility": 1.0, "terms": {"t": 1.0}}
    final = {"best": "gd", "groups": [["gd"]], "reference": None,
             "by_name": {"gd": {"finals_by_draw": [0.8], "mean": 0.8, "interval": [0.7, 0.9], "paired": {}},
                         "oracle": {"finals_by_draw": [0.9], "mean": 0.9, "interval": [0.8, 1.0], "paired": {}}}}
    full = {"reported": [entry], "audits": [audits], "oracle_scores": [scores], "target_scores": {"0": scores},
            "draws": [{"seed": 0}], "options": {"size": "micro", "grid": [1.0], "seeds": [0]}, "wall_seconds": 60.0,
            "statistics": {"final": final, "robust_final": {"draws": 1, "by_name": {
                "gd": {**robust, "finals_by_draw": [robust["mean"]]}, "oracle": {"mean": 0.9, "finals_by_draw": [0.9]}}}}}
    full["summary"] = summarize(full)
    assert full["summary"][0]["robust_final"] == pytest.approx(robust["mean"])
    without_oracle = {**full, "audits": [{"gd": audits["gd"]}]}  # as a --jobs worker holds them
    write_bench_report(without_oracle, tmp_path)
    write_bench_report(full, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Robust final" in report and "](robust_final.png)" in report and "](attacks.png)" in report
    assert (tmp_path / "attacks.png").stat().st_size > 5000


@pytest.mark.slow  # worker processes, each starting unlearning processes
def test_jobs_run_the_methods_in_worker_processes_and_report_them_together(micro_target, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))
    results = run_bench(BenchOptions(out=tmp_path, size="micro", methods=["gd", "ga"], grid=[1.0], seeds=[0],
                                     audit=False, jobs=2, draws=1))
    assert [entry["method"] for entry in results["reported"]] == ["gd", "ga"]
    # One learning rate: nothing to choose, so no tuning run and no tuning draw.
    assert results["tuning"] == [] and list(results["targets"]) == ["0"]
    assert [entry["lr_multiplier"] for entry in results["reported"]] == [1.0, 1.0]
    # Each method ran in its own worker, which left its log and its run records for the report.
    for index, method in enumerate(["gd", "ga"]):
        assert f"{method} draw 0 seed 0: final" in (tmp_path / f"worker-methods-{index}.log").read_text()
        assert (tmp_path / "runs" / f"{method}-d0-seed0.done.json").is_file()
    assert [p.name for p in tmp_path.glob("worker-targets-*.log")] == ["worker-targets-0.log"]
    assert (tmp_path / "report.md").is_file()


def test_kept_results_are_what_the_audit_would_compute(micro_target, tmp_path: Path) -> None:
    """The audit starts from the reported scoring's results: they must be the audit's own un-attacked
    evaluation (same rows, batch size, decoding and attacks on the MIA)."""
    from dataclasses import replace

    from unlearnlm.audit.run import AuditSettings
    from unlearnlm.bench.scoring import evaluation_data, score
    from unlearnlm.evaluation.evaluator import EvalSettings, load_model, run_evaluation

    target = micro_target[0]
    data = evaluation_data(target)
    data = replace(data, forget=data.forget[:6], retain=data.retain[:6])
    settings = AuditSettings()
    score(target, data, settings.batch_size, full=True, keep=tmp_path / "kept.json")
    kept = json.loads((tmp_path / "kept.json").read_text())
    model, tokenizer = load_model(target, settings.dtype)
    own = run_evaluation(model, tokenizer, data, EvalSettings(batch_size=settings.batch_size,
                                                              max_new_tokens=settings.max_new_tokens))
    for key in ("settings", "timings", "model_source"):
        kept.pop(key, None), own.pop(key, None)
    assert kept == json.loads(json.dumps(own))


def test_the_bench_settle_pass_is_the_sugd_settle_preset() -> None:
    from unlearnlm.bench.variants import variants
    from unlearnlm.config import load_config

    settle = variants(n_layers=4)["sugd-settle"].settle
    assert load_config("sugd-settle") == load_config(None, [*settle, "optim.lr=0.001"])
    assert load_config("sugd-settle") != load_config("sugd-level")
