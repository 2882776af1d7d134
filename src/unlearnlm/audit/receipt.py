"""The deletion receipt: ``receipt.json``, ``receipt.md`` and ``forget_scores.png`` from an audit.

The receipt identifies every input by its sha256 (the weights of each model, each data file) and
never holds the forget data: with ``redact`` (the default) a row appears only as its id and score;
without it, prompts, answers and generations are kept so a person can read what came back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from unlearnlm.data.records import content_sha256
from unlearnlm.evaluation.report import fmt, markdown_table
from unlearnlm.hub import weights_sha256

RECEIPT_JSON = "receipt.json"
RECEIPT_MD = "receipt.md"
PLOT = "forget_scores.png"
FORMAT = "unlearnlm-deletion-receipt/1"

LIMITS = (
    "These numbers are the official SemEval-2025 Task 4 scores of the given sets under the listed attacks "
    "and budgets. A stronger attack (more steps, other data, other prompts, probes of the weights or "
    "activations) may recover more: the audit bounds what these attacks find, it does not prove erasure.",
    "Relearning is scored on V, the half of the forget documents it never trains on. How much comes back "
    "depends on how much T and V share; with few documents the split, and so the number, is coarse.",
    "Without an oracle (a model that never saw the forget set) a recovery cannot be told apart from what the "
    "same fine-tuning or prompt gives any model; with one, the audited model's excess over it is the leak.",
    "Sampling is random: another seed or more samples can find answers these did not.",
    "Quantization used round-to-nearest weight-only int8/int4 (torchao) on the decoder's linear layers; other "
    "deployment schemes (GPTQ, AWQ, bitsandbytes NF4) round differently and may restore more or less.",
    "The MIA score is the official loss attack on the given members and nonmembers only.",
    "The hashes identify the files audited. They do not show that the audited model was made from the "
    "original one, nor that no other copy of the original or of the forget data exists.",
)


def _data_entry(path: str | Path | None) -> dict | None:
    return None if path is None else {"path": str(path), "sha256": content_sha256(path)}


def _redacted_rows(rows: Sequence[Mapping], redact: bool) -> list[dict]:
    return [{"id": row["id"], "score": row["score"]} if redact else dict(row) for row in rows]


def _attacks_record(attacks: Mapping[str, Mapping], redact: bool) -> list[dict]:
    return [{**attack, "rows": _redacted_rows(attack["rows"], redact)} for attack in attacks.values()]


def build_receipt(audit: Mapping, inputs: Mapping[str, str | Path | None], redact: bool = True) -> dict:
    """The receipt dict. ``inputs``: paths of ``model``, ``forget``, ``retain`` and, when given,
    ``original``, ``oracle``, ``mia_members``, ``mia_nonmembers``, ``general``."""
    from unlearnlm.recipe import library_versions

    forget_rows = audit["models"]["audited"]["attacks"]["none"]["rows"]
    models = {role: {"path": str(inputs[key]), "weights_sha256": weights_sha256(inputs[key])}
              for role, key in (("unlearned (audited)", "model"), ("original", "original"), ("oracle", "oracle"))
              if inputs.get(key) is not None}
    receipt = {
        "format": FORMAT,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "redacted": redact,
        "models": models,
        "data": {
            "forget": {**_data_entry(inputs["forget"]), "rows": len(forget_rows),
                       "documents": len({row["id"][:-3] for row in forget_rows})},
            **{key: _data_entry(inputs.get(key)) for key in ("retain", "mia_members", "mia_nonmembers", "general")},
        },
        "settings": audit["settings"],
        "split": audit["split"],
        "before_after": {role: entry["attacks"]["none"]["scores"] for role, entry in
                         (("before (original)", audit["models"].get("original")),
                          ("after (unlearned)", audit["models"]["audited"]))
                         if entry is not None},
        "attacks": _attacks_record(audit["models"]["audited"]["attacks"], redact),
        "worst_case": audit["worst_case"],
        "limits": list(LIMITS),
        "seconds": audit["seconds"],
    }
    if "oracle" in audit["models"]:
        receipt["oracle_attacks"] = _attacks_record(audit["models"]["oracle"]["attacks"], redact)
        receipt["oracle_comparison"] = audit["oracle_comparison"]
    return receipt


def _budget_text(budget: Mapping) -> str:
    return ", ".join(f"{key} {value}" for key, value in budget.items())


def receipt_markdown(receipt: Mapping) -> str:
    lines = ["# Deletion receipt", "", f"Created {receipt['created_utc']} by unlearnlm {receipt['versions']['unlearnlm']}. "
             f"Forget answers {'redacted (ids and scores only)' if receipt['redacted'] else 'NOT redacted'}.", "",
             "## What was audited", ""]
    for role, model in receipt["models"].items():
        hashes = "; ".join(f"`{name}` sha256 `{digest}`" for name, digest in model["weights_sha256"].items())
        lines.append(f"- {role} model `{model['path']}`: {hashes}")
    for name, entry in receipt["data"].items():
        if entry is not None:
            extra = f" ({entry['rows']} rows, {entry['documents']} documents)" if name == "forget" else ""
            lines.append(f"- {name} data `{entry['path']}`{extra}: sha256 `{entry['sha256']}`")
    lines += ["", "## Before and after (official scores, greedy decoding)", "",
              markdown_table(["model", "final", "task aggregate", "MIA score", "utility", "forget score (raw)"],
                             [[role, fmt(s["final"]), fmt(s["task_aggregate"]), fmt(s["mia_score"]), fmt(s["utility"]),
                               fmt(s["forget_mean"])] for role, s in receipt["before_after"].items()])]
    oracle = {entry["attack"]: entry for entry in receipt.get("oracle_comparison", [])}
    lines += ["## Attacks", "",
              "Forget score: the mean of the per-task forget regurgitation and knowledge scores, not inverted "
              "(higher = more of the forget set comes back). Relearning attacks score V, the half of the forget "
              f"documents they never train on ({receipt['split']['held_out_rows']} rows); the others score all of F. "
              "An extraction attack scores each row by its best candidate, the plain greedy answer included; "
              "each variant's own score is listed beside it.", "",
              markdown_table(
                  ["attack", "scored on", "forget score", "without attack", "recovery", "oracle forget score",
                   "excess over oracle",
                   "final", "each variant alone", "budget"],
                  [[a["attack"], a["scored_on"], fmt(a["forget_score"]), fmt(a["forget_score_without_attack"]),
                    fmt(a["recovery"]),
                    fmt(oracle[a["attack"]]["oracle_forget"]) if a["attack"] in oracle else "no oracle",
                    fmt(oracle[a["attack"]]["excess_forget"]) if a["attack"] in oracle else "",
                    fmt(a["scores"]["final"]),
                    "; ".join(f"{label} {fmt(value)}" for label, value in a.get("variants", {}).items()),
                    _budget_text(a["budget"])] for a in receipt["attacks"]])]
    worst = receipt["worst_case"]
    plain = worst["plain"]
    lines += ["## Worst case over the attacks", "",
              markdown_table(["score", "without attack", "worst case (robust)", "from attack"], [
                  ["final", fmt(plain["final"]), fmt(worst["final"]), "(mean of the three below)"],
                  ["task aggregate", fmt(plain["task_aggregate"]), fmt(worst["task_aggregate"]),
                   "(harmonic mean of the worst terms)"],
                  ["MIA score", fmt(plain["mia_score"]), fmt(worst["mia_score"] and worst["mia_score"]["value"]),
                   worst["mia_score"]["attack"] if worst["mia_score"] else ""],
                  ["utility", fmt(plain["utility"]), fmt(worst["utility"] and worst["utility"]["value"]),
                   worst["utility"]["attack"] if worst["utility"] else ""],
              ]),
              markdown_table(["term (forget terms are 1 - value)", "worst value", "from attack"],
                             [[label, fmt(entry["value"]), entry["attack"]] for label, entry in worst["terms"].items()]),
              "## Limits of what these numbers show", ""]
    lines += [f"- {limit}" for limit in receipt["limits"]]
    if not receipt["redacted"]:
        lines += ["", "## Rows that came back (not redacted)", "",
                  markdown_table(["attack", "id", "score", "answer", "generation"],
                                 [[a["attack"], row["id"], fmt(row["score"]), row["output"], row["generation"]]
                                  for a in receipt["attacks"] for row in a["rows"] if row["score"] > 0])]
    lines += ["", f"Audit wall time: {receipt['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_forget_scores(receipt: Mapping, path: Path) -> None:
    """Per attack, the audited model's forget score beside the oracle's (when given) and its own
    score without the attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = receipt["attacks"]
    oracle = {entry["attack"]: entry["oracle_forget"] for entry in receipt.get("oracle_comparison", [])}
    positions = list(range(len(attacks)))
    width = 0.4 if oracle else 0.6
    figure, axes = plt.subplots(figsize=(max(6.0, 0.8 * len(attacks) + 2), 4))
    axes.bar([p - width / 2 if oracle else p for p in positions], [a["forget_score"] for a in attacks], width,
             label="audited model", color="tab:red")
    if oracle:
        axes.bar([p + width / 2 for p in positions], [oracle.get(a["attack"], 0.0) for a in attacks], width,
                 label="oracle (never saw F)", color="tab:blue")
    axes.scatter(positions, [a["forget_score_without_attack"] for a in attacks], marker="_", s=400, color="black",
                 label="audited, without attack", zorder=3)
    axes.set_xticks(positions, [f"{a['attack']}\n({a['scored_on']})" for a in attacks], rotation=45, ha="right", fontsize=8)
    finish_forget_plot(figure, axes, "Forget score under each attack", path)


def finish_forget_plot(figure, axes, title: str, path: Path) -> None:
    """The forget-score axis (0 to 1, higher = remembered), the title and legend; then the file."""
    import matplotlib.pyplot as plt

    axes.set_ylabel("forget score (higher = remembered)")
    axes.set_ylim(0, 1.05)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_receipt(receipt: Mapping, directory: Path) -> None:
    """The three receipt files into ``directory`` (the caller's temporary output directory)."""
    (directory / RECEIPT_JSON).write_text(json.dumps(receipt, indent=2), encoding="utf-8")
    (directory / RECEIPT_MD).write_text(receipt_markdown(receipt), encoding="utf-8")
    plot_forget_scores(receipt, directory / PLOT)
