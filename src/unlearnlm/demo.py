"""`unlearnlm demo`: the whole job on real LUME data, offline, in minutes on a laptop CPU.

Build (or reuse) the tiny `mini` models: the target that memorized LUME documents and the oracle
retrained without its forget set, both fine-tuned from a small pretrained base (shipped in the
package for the bundled data). Unlearn the target's forget set with `--config auto` (SUGD calibrated on
the target itself from its unseen documents, ``benchmark/unseen.jsonl``), score
the base, target, oracle and unlearned model with the official SemEval-2025 Task 4 scoring (utility
in place of MMLU), and print and write the comparison: the unlearned model should land near the oracle.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from unlearnlm.bench.sizes import Size
from unlearnlm.errors import UserError

MARKER = "demo.json"


def check_demo_dir(out: Path) -> None:
    """The demo may replace its own earlier output, never anything else (nor a place that holds what a
    user keeps, see ``paths.refuse_unsafe_output``)."""
    from unlearnlm.paths import refuse_unsafe_output

    refuse_unsafe_output(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out}: exists, is not empty and is not an earlier demo output; choose another --out")


def claim_demo_dir(out: Path) -> None:
    """``check_demo_dir``, then the output's lock (``paths.lock_writer``) for as long as the demo runs."""
    from unlearnlm.paths import lock_writer, resolved_output

    check_demo_dir(out)
    lock_writer(resolved_output(out))


def prepare_demo_dir(out: Path) -> None:
    check_demo_dir(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def run_demo(out: Path, size: str | Size = "mini", seed: int = 0, config: str = "auto", redact: bool = False,
             batch_size: int = 16) -> dict:
    from rich.console import Console

    from unlearnlm.api import unlearn
    from unlearnlm.bench.target import ORACLE_DIR, cached_target, read_models
    from unlearnlm.config import load_config
    from unlearnlm.data.records import load_documents, load_records
    from unlearnlm.data.sets import write_unseen
    from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, evaluate_paths
    from unlearnlm.evaluation.report import results_table, terms_table, write_report

    console = Console()
    prepare_demo_dir(out)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    target_dir, built = cached_target(size, seed)
    timings["target_s"] = time.perf_counter() - started
    console.print(f"target: {target_dir} ({'built' if built else 'from cache'}, {timings['target_s']:.0f}s)")

    sets = target_dir / "benchmark"
    started = time.perf_counter()
    resolved = load_config(config)
    # auto calibrates itself on the unseen documents the target saw only in pretraining (no evaluation set)
    unseen = write_unseen(sets) if resolved.auto.enabled else None
    run = unlearn(target_dir, sets / "forget.jsonl", sets / "retain.jsonl", out / "unlearned", resolved, unseen=unseen)
    timings["unlearn_s"] = time.perf_counter() - started

    started = time.perf_counter()
    data = EvalData(load_records(sets / "forget.jsonl", "forget"), load_records(sets / "retain.jsonl", "retain"),
                    load_documents(sets / "mia_members.jsonl"), load_documents(sets / "mia_nonmembers.jsonl"),
                    load_records(sets / "general.jsonl", "retain"))
    names = ("base", "target", "oracle", "unlearned")
    paths = [read_models(target_dir)["base"], target_dir, target_dir / ORACLE_DIR, out / "unlearned"]
    evaluated = evaluate_paths(paths, data, EvalSettings(batch_size=batch_size, redact=redact))
    named = [(name, results) for name, (_, results) in zip(names, evaluated)]
    write_report(named, out / "evaluation")
    timings["evaluate_s"] = time.perf_counter() - started

    console.print(terms_table(named))
    console.print(results_table(named))
    if "verdict" in run:
        console.print(f"verdict of the held-out check: {run['verdict']['summary']}")
    report = demo_markdown(named, run, timings, target_dir, config)
    (out / "report.md").write_text(report, encoding="utf-8")
    summary = {"target": str(target_dir), "config": config, "timings": timings, "unlearn": run,
               "scores": {name: {k: v for k, v in results.items() if k != "generations"} for name, results in named}}
    (out / MARKER).write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"report: {out / 'report.md'}  (target {timings['target_s']:.0f}s, unlearning {timings['unlearn_s']:.0f}s, "
                  f"evaluation {timings['evaluate_s']:.0f}s)")
    return summary


def demo_markdown(named: list, run: dict, timings: dict, target_dir: Path, config: str) -> str:
    from unlearnlm.evaluation.report import comparison_markdown, fmt, markdown_table

    labels = named[0][1]["aggregated-term-labels"]
    terms = [[label, *(fmt(results["aggregated-terms"][i]) for _, results in named)] for i, label in enumerate(labels)]
    return "\n".join([
        f"# unlearnlm demo: `{config}` on a tiny target that memorized LUME",
        "",
        "The base is pretrained on biographies (the MIA members and nonmembers among them), the target is the base "
        "fine-tuned on the forget, retain and general sets until it memorized them, the oracle is the base fine-tuned "
        "without the forget set: what perfect unlearning would give.",
        "",
        comparison_markdown(named).replace("# Model comparison\n\n", ""),
        "",
        "## The 12 aggregated terms (forget terms are 1 - value; higher is better everywhere)",
        "",
        markdown_table(["term", *(name for name, _ in named)], terms),
        "",
        f"Target: `{target_dir}`. Unlearning preset: `{config}`, {run['steps']} steps, "
        f"{run['trainable_parameters']:,} trainable parameters, {run['wall_seconds']:.1f}s. "
        f"Wall time: target {timings['target_s']:.0f}s, unlearning {timings['unlearn_s']:.0f}s, "
        f"evaluation {timings['evaluate_s']:.0f}s.",
        "",
        *([f"Verdict of the held-out check (no evaluation set read): {run['verdict']['summary']}.", ""]
          if "verdict" in run else []),
    ])
