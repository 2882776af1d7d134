"""Writing evaluation results: JSON, one generation per line, markdown summaries, rich tables.

One model: ``evaluation_results.json``, ``generations.jsonl`` and ``summary.md`` in the output
directory. Several models: one such directory per model and a ``summary.md`` comparison table at
the top. Everything is written to a temporary directory beside the output and renamed into place,
so a crash never leaves half a report. ``redact`` (from the results' settings) masks forget answers
and generations in markdown and on screen; ``generations.jsonl`` keeps them, since the scores must be
recomputable from it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rich.table import Table

from unlearnlm.data.records import write_jsonl
from unlearnlm.evaluation.metrics import METRICS
from unlearnlm.evaluation.scoring import KNOWLEDGE, REGURGITATION, SPLITS, headline
from unlearnlm.paths import check_output_dir, replace_dir

RESULTS_FILE = "evaluation_results.json"
GENERATIONS_FILE = "generations.jsonl"
SUMMARY_FILE = "summary.md"
GENERATION_FIELDS = ("id", "task", "kind", "split", "input", "output", "generation", "score")
REDACTED = "[redacted]"
SAMPLE_ROWS_PER_SPLIT = 3
HEADLINE_COLUMNS = tuple((name, metric.label) for name, metric in METRICS.items())
NamedResults = Sequence[tuple[str, Mapping]]


def fmt(value: float | None, digits: int = 4, std: float | None = None) -> str:
    """A score for a table: ``n/a`` when missing, with ``± std`` when a spread is given."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def displayed_rows(results: Mapping) -> list[dict]:
    """The generation rows as printed: forget answers and generations masked under ``redact``."""
    redact = results.get("settings", {}).get("redact", False)
    return [
        {**row, "output": REDACTED, "generation": REDACTED} if redact and row["split"] == "forget" else dict(row)
        for row in results["generations"]
    ]


def _labelled_terms(results: Mapping) -> dict[str, float]:
    return dict(zip(results["aggregated-term-labels"], results["aggregated-terms"]))


def _per_task_rows(results: Mapping) -> list[list[str]]:
    rows = []
    for split in SPLITS:
        block = results[f"{split}-set"]
        rows.append([split, "overall", fmt(block[f"overall-{REGURGITATION}"]), fmt(block[f"overall-{KNOWLEDGE}"])])
        rows += [[split, task, fmt(values[REGURGITATION]), fmt(values[KNOWLEDGE])]
                 for task, values in block.items() if not task.startswith("overall-")]
    return rows


def _sample_rows(results: Mapping) -> list[list[str]]:
    rows = displayed_rows(results)
    samples = []
    for split in SPLITS:
        samples += [[row["split"], row["id"], row["kind"], row["output"], row["generation"], fmt(row["score"])]
                    for row in rows if row["split"] == split][:SAMPLE_ROWS_PER_SPLIT]
    return samples


def summary_markdown(results: Mapping, name: str = "model") -> str:
    scores = headline(results)
    parts = [f"# Evaluation of {name}\n\n", "## Scores\n\n",
             markdown_table([label for _, label in HEADLINE_COLUMNS], [[fmt(scores[key]) for key, _ in HEADLINE_COLUMNS]])]
    if scores["final"] is None:
        parts.append("\nThe final score needs both the MIA and utility or MMLU.\n")
    parts += ["\n## Regurgitation and knowledge (raw means)\n\n",
              markdown_table(["split", "task", "regurgitation", "knowledge"], _per_task_rows(results)),
              "\n## Aggregated terms (official order; forget terms are 1 - value)\n\n",
              markdown_table(["#", "term", "value"], [[index + 1, label, fmt(value)] for index, (label, value)
                                                     in enumerate(_labelled_terms(results).items())])]
    if "mia" in results:
        parts += [f"\n## Membership inference (Min-K% k = {results['mia']['k']})\n\n",
                  markdown_table(["attack", "AUC", "score"], [[attack, fmt(values["auc"]), fmt(values["score"])]
                                                             for attack, values in results["mia"]["attacks"].items()])]
    if "utility_details" in results:
        details = results["utility_details"]
        parts += [f"\n## Utility ({details['n_questions']} questions)\n\n",
                  markdown_table(["task", "accuracy"], [[task, fmt(value)] for task, value in details["per_task"].items()])]
    if "mmlu" in results:
        mmlu = results["mmlu"]
        warning = " (below the 0.371 threshold)" if mmlu["below_threshold"] else ""
        parts += [f"\n## MMLU: {fmt(mmlu['average_acc'])}{warning}, {mmlu['n_questions']} questions, {mmlu['shots']}-shot\n\n",
                  markdown_table(["subject", "accuracy"], [[name, fmt(value)] for name, value in mmlu["subject_acc"].items()])]
    parts += ["\n## Sample generations\n\n",
              markdown_table(["split", "id", "kind", "expected", "generation", "score"], _sample_rows(results)),
              "\n## Settings\n\n", markdown_table(["setting", "value"], results["settings"].items()),
              "\n## Timings\n\n",
              markdown_table(["phase", "seconds"], [[phase, f"{seconds:.1f}"] for phase, seconds in results["timings"].items()])]
    return "".join(parts)


def comparison_markdown(named_results: NamedResults) -> str:
    rows = [[name, *(fmt(headline(results)[key]) for key, _ in HEADLINE_COLUMNS)] for name, results in named_results]
    return "# Model comparison\n\n" + markdown_table(["model", *(label for _, label in HEADLINE_COLUMNS)], rows)


def _write_one(results: Mapping, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    official = {key: value for key, value in results.items() if key != "generations"}
    (directory / RESULTS_FILE).write_text(json.dumps(official, indent=4) + "\n", encoding="utf-8")
    rows = ({field: row[field] for field in GENERATION_FIELDS} for row in results["generations"])
    write_jsonl(rows, directory / GENERATIONS_FILE)
    (directory / SUMMARY_FILE).write_text(summary_markdown(results, name), encoding="utf-8")


def write_report(named_results: NamedResults, out: str | Path, overwrite: bool = False) -> Path:
    """Write one model's files into ``out``, or several models' into ``out/<name>/`` plus a comparison."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        if len(named_results) == 1:
            _write_one(named_results[0][1], staging, named_results[0][0])
        else:
            for name, results in named_results:
                _write_one(results, staging / name, name)
            (staging / SUMMARY_FILE).write_text(comparison_markdown(named_results), encoding="utf-8")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def results_table(named_results: NamedResults) -> Table:
    """The headline scores of every model, for the terminal."""
    table = Table(title="SemEval-2025 Task 4 scores")
    table.add_column("model")
    for _, label in HEADLINE_COLUMNS:
        table.add_column(label, justify="right")
    for name, results in named_results:
        scores = headline(results)
        table.add_row(name, *(fmt(scores[key]) for key, _ in HEADLINE_COLUMNS))
    return table


def terms_table(named_results: NamedResults) -> Table:
    """The aggregated terms side by side, one column per model."""
    table = Table(title="Aggregated terms (forget terms are 1 - value)")
    table.add_column("term")
    for name, _ in named_results:
        table.add_column(name, justify="right")
    labels = list(dict.fromkeys(label for _, results in named_results for label in results["aggregated-term-labels"]))
    for label in labels:
        table.add_row(label, *(fmt(_labelled_terms(results).get(label)) for _, results in named_results))
    return table
