"""``--config auto``'s goals, measured on a cached target: the unlearned model against the oracle (retrained
without F), and the cost against one ``sugd-level`` run on the same target.

    UNLEARNLM_CACHE=/work/cache-demo python scripts/auto_goals.py --size mini --out auto-goals

The target, its oracle and its unseen documents (``benchmark/unseen.jsonl``) come from the cache (built
there first when missing). Runs, one after the other on the same machine:

- ``sugd-level`` as its preset says, with the level read from U's level half (as ``unlearnlm level``);
- ``--config auto --unseen benchmark/unseen.jsonl``;

then scores target, oracle and both runs on the target's evaluation sets (which auto never read), and
prints, and writes to OUT (``results.json``, ``goals.md``): auto's final against 0.85x the oracle's with
an MIA score above 0; auto's whole wall time (probes, checks and saving included) against sugd-level's
(goal: at most 2x); whether the verdict agrees with the evaluation's own MIA (AUC within 0.5 +- 0.15).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

GOALS = {"final_vs_oracle": 0.85, "cost_vs_sugd_level": 2.0, "agreement_auc_half_width": 0.15}
NAMES = ("target", "oracle", "sugd-level", "auto")


def timed_unlearn(target: Path, out: Path, config: str, **options) -> tuple[dict, float]:
    from unlearnlm.api import unlearn

    sets = target / "benchmark"
    started = time.perf_counter()
    record = unlearn(target, sets / "forget.jsonl", sets / "retain.jsonl", out, config, overwrite=True, show_progress=False,
                     **options)
    return record, time.perf_counter() - started


def sugd_level_run(target: Path, out: Path, unseen: Path) -> tuple[dict, float]:
    """sugd-level at the level of U's level half, the documents auto reads its level from; the level's
    reading is part of the run's time, as it is part of auto's."""
    from unlearnlm.auto.unseen import read_unseen, split_unseen
    from unlearnlm.evaluation.evaluator import load_model
    from unlearnlm.evaluation.mia import mean_document_loss

    started = time.perf_counter()
    model, tokenizer = load_model(target)
    level = mean_document_loss(model, tokenizer, split_unseen(read_unseen(unseen), 0).level, 16)
    seconds = time.perf_counter() - started
    record, run_seconds = timed_unlearn(target, out, "sugd-level", overrides=[f"method_args.forget_ceiling={level:.4f}"])
    return record, seconds + run_seconds


def evaluate(target: Path, models: list[Path]) -> list[dict]:
    from unlearnlm.api import evaluate_models

    sets = target / "benchmark"
    named = evaluate_models(models, sets / "forget.jsonl", sets / "retain.jsonl", members=sets / "mia_members.jsonl",
                            nonmembers=sets / "mia_nonmembers.jsonl", general=sets / "general.jsonl")
    return [{"final": results["aggregate-score"], "task_aggregate": results["harmonic-mean-task-aggregate"],
             "mia_score": results["mia_final_score"], "mia_auc": results["mia_loss_acc"], "utility": results["utility"]}
            for _, results in named]


def one_draw(size: str, seed: int, draw: int, out: Path, auto_overrides: list[str]) -> dict:
    """sugd-level and auto on one cached target, one after the other, then all four models scored."""
    from unlearnlm.bench.target import BENCHMARK_DIR, ORACLE_DIR, cached_target
    from unlearnlm.data.sets import write_unseen

    target, _ = cached_target(size, seed, draw)
    unseen = write_unseen(target / BENCHMARK_DIR)
    level_record, level_seconds = sugd_level_run(target, out / "sugd-level", unseen)
    auto_record, auto_seconds = timed_unlearn(target, out / "auto", "auto", unseen=unseen, overrides=auto_overrides)
    scores = dict(zip(NAMES, evaluate(target, [target, target / ORACLE_DIR, out / "sugd-level", out / "auto"])))
    verdict, auto_scores, oracle = auto_record["verdict"], scores["auto"], scores["oracle"]
    agrees = verdict["forgotten"] == (abs(auto_scores["mia_auc"] - 0.5) <= GOALS["agreement_auc_half_width"])
    return {"seed": seed, "draw": draw, "target": str(target), "scores": scores,
            "seconds": {"sugd-level": level_seconds, "auto": auto_seconds}, "auto": auto_record["auto"],
            "auto_validation_seconds": auto_record["validation_seconds"], "verdict": verdict,
            "goals": {"final_vs_oracle": auto_scores["final"] / oracle["final"],
                      "mia_score_above_0": auto_scores["mia_score"] > 0,
                      "cost_vs_sugd_level": auto_seconds / level_seconds, "verdict_agrees_with_eval_mia": agrees}}


def report(draws: list[dict]) -> list[str]:
    lines = ["| seed | model | final | task aggregate | MIA score | MIA AUC | utility |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for result in draws:
        lines += [f"| {result['seed']} | {name} | {row['final']:.3f} | {row['task_aggregate']:.3f} | {row['mia_score']:.3f} | "
                  f"{row['mia_auc']:.3f} | {row['utility']:.3f} |" for name, row in result["scores"].items()]
    lines += ["", "| seed | auto / oracle | auto s | sugd-level s | cost | probes s | checks s | rate | verdict | "
                  "evaluation MIA AUC | agree |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for result in draws:
        goals, seconds, verdict = result["goals"], result["seconds"], result["verdict"]
        lines.append(f"| {result['seed']} | {goals['final_vs_oracle']:.3f} | {seconds['auto']:.1f} | "
                     f"{seconds['sugd-level']:.1f} | "
                     f"{goals['cost_vs_sugd_level']:.2f}x | {result['auto']['probe_seconds']:.1f} | "
                     f"{result['auto_validation_seconds']:.1f} | {result['auto']['lr']:.3g} | "
                     f"{'forgotten' if verdict['forgotten'] else 'not forgotten'} | {result['scores']['auto']['mia_auc']:.3f} | "
                     f"{'yes' if goals['verdict_agrees_with_eval_mia'] else 'no'} |")
    means = {name: float(np.mean([result["scores"][name]["final"] for result in draws])) for name in NAMES}
    spread = {name: float(np.std([result["scores"][name]["final"] for result in draws], ddof=1)) if len(draws) > 1 else 0.0
              for name in NAMES}
    cost = float(np.mean([result["goals"]["cost_vs_sugd_level"] for result in draws]))
    agree = sum(result["goals"]["verdict_agrees_with_eval_mia"] for result in draws)
    lines += ["", f"mean final: auto {means['auto']:.3f} (SD over draws {spread['auto']:.3f}), "
                  f"sugd-level {means['sugd-level']:.3f} "
                  f"(SD {spread['sugd-level']:.3f}), oracle {means['oracle']:.3f}: auto at {means['auto'] / means['oracle']:.3f} "
                  f"of the oracle (goal >= 0.9)",
              f"cost: auto at {cost:.2f}x one sugd-level run, mean over draws (goal <= {GOALS['cost_vs_sugd_level']})",
              f"verdict agrees with the evaluation's MIA on {agree} of {len(draws)} draws (goal >= 80%)"]
    return lines


def main() -> None:
    from unlearnlm.kernels import pin_kernels

    pin_kernels()  # as the command line does: the cached targets were built with pinned kernels
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="the target seeds (draws), one run each")
    parser.add_argument("--draw", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for the auto run")
    parser.add_argument("--out", type=Path, default=Path("auto-goals"))
    args = parser.parse_args()
    draws = []
    for seed in args.seed:
        out = args.out / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        draws.append(one_draw(args.size, seed, args.draw, out, args.overrides))
    lines = report(draws)
    (args.out / "results.json").write_text(json.dumps({"overrides": args.overrides, "draws": draws}, indent=2))
    (args.out / "goals.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
