"""A request's receipt (``receipt.json``, ``receipt.md``) and the rows of ``ledger show``.

A receipt identifies the forget set by sha256 and row count only (its rows too with
``redact=False``), the weights before and after by the sha256 of each safetensors file, and holds
the settings, the verdict of a self-calibrating run, the request's own scores, every earlier
request's forget scores on the new model, the drift of the retain set and utility from the original
model, and the light audit (the audit's extraction attacks).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from unlearnlm.data.raw import Rows
from unlearnlm.evaluation.report import fmt, markdown_table

FORMAT = "unlearnlm-ledger-receipt/1"

LIMITS = (
    "Scores are the official SemEval-2025 Task 4 scores of greedy generations; the light audit adds the "
    "audit's extraction attacks (sampling, cut prompts, earlier context) and no attack that changes the "
    "weights: `unlearnlm audit` runs those.",
    "An earlier request is re-scored from its forget set, read again where it was read; once its owner deleted "
    "that file, it is listed as unavailable.",
    "The hashes show which weights each request started from and made. They do not show that no other copy of "
    "the original model, of a kept earlier model, or of the forget data exists.",
)


def _forget_entry(rows: Rows, redact: bool) -> dict:
    entry = {"sha256": rows.sha256, "rows": len(rows), "raw_documents": rows.is_raw}
    if not redact:
        entry["data"] = list(rows.documents) or [record.to_dict() for record in rows.records]
    return entry


def _term_changes(now: Mapping[str, float], then: Mapping[str, float]) -> dict:
    """The largest change of a forget term either way, and the largest fall (a forget term is 1 -
    score, so a fall is what came back; negative when every term rose: more forgotten)."""
    shared = sorted(set(now) & set(then))
    if not shared:
        return {"largest_term_change": None, "came_back": None}
    return {"largest_term_change": max(abs(now[label] - then[label]) for label in shared),
            "came_back": max(then[label] - now[label] for label in shared)}


def _earlier(ledger, evaluated: Mapping) -> list[dict]:
    entries = []
    for number, scores in sorted(evaluated["earlier"].items()):
        receipt = ledger.receipt(number)
        entry = {"request": number, "forget_sha256": receipt["forget"]["sha256"], **scores}
        if "forget_terms" in scores:
            own = receipt["scores"]["own"]
            entry["right_after_own_request"] = own
            entry.update(_term_changes(scores["forget_terms"], own["forget_terms"]))
        entries.append(entry)
    return entries


def _calibration(key: Mapping, run: Mapping) -> dict | None:
    """A self-calibrating run's rate and where it came from: probed by this request, reused from the
    request named, or given in the settings."""
    auto = run.get("auto")
    return None if auto is None else {"lr": auto["lr"], "source": key["rate_source"], "probes": len(auto["probes"]),
                                      "probe_seconds": auto["probe_seconds"]}


def _settling(key: Mapping, run: Mapping) -> dict | None:
    """Which earlier requests a self-calibrating run settled and checked with this one, which it
    skipped (their forget sets unavailable), and how many forget rows each of its settling passes trained."""
    auto = run.get("auto")
    if auto is None:
        return None
    return {"earlier_requests": key["settled_with"],
            "skipped": [number for number in range(1, key["request"]) if number not in key["settled_with"]],
            "forget_rows": auto["settle_forget_rows"], "checked_forget_documents": auto["forget_documents"]}


def _drift(original: Mapping, now: Mapping) -> dict:
    def pair(key: str) -> dict:
        before, after = original[key], now[key]
        return {"original": before, "now": after, "change": None if None in (before, after) else after - before}

    return {"retain_score": pair("retain_score"), "utility": pair("utility"),
            "retain_terms": {label: {"original": value, "now": now["retain_terms"].get(label)}
                             for label, value in original["retain_terms"].items()}}


def _audit(audit: Mapping) -> dict:
    attacks = [{key: attack[key] for key in ("attack", "family", "budget", "forget_score",
                                                "forget_score_without_attack", "recovery")}
               for attack in audit["attacks"].values()]
    return {"settings": audit["settings"], "attacks": attacks,
            "worst_forget_score": max(attack["forget_score"] for attack in attacks),
            "worst_case": audit["worst_case"]}


def build_receipt(ledger, number: int, key: Mapping, forget_rows: Rows, run: Mapping, evaluated: Mapping,
                  redact: bool) -> dict:
    """The receipt of request ``number`` (``ledger``: a ``store.Ledger``; ``run``: the unlearning's
    ``run.json``; ``evaluated``: the scores of ``requests._evaluate``)."""
    return {
        "format": FORMAT,
        "request": number,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": run["versions"],
        "previous_receipt_sha256": key["previous_receipt_sha256"],
        "redacted": redact,
        "forget": _forget_entry(forget_rows, redact),
        "weights_sha256": {"before": ledger.current_weights(), "after": run["output_weights_sha256"]},
        "settings": {"config": key["config"], "overrides": key["overrides"], "resolved": run["config"]},
        "verdict": run.get("verdict"),
        "calibration": _calibration(key, run),
        "settling": _settling(key, run),
        "unlearning": {key: run[key] for key in ("steps", "wall_seconds", "call_seconds", "stopped_reason",
                                                 "trainable_parameters")},
        "scores": {"own": evaluated["own"], **evaluated["headline"], "terms": evaluated["terms"]},
        "earlier_requests": _earlier(ledger, evaluated),
        "drift": _drift(ledger.genesis["original_scores"], evaluated["retain_side"]),
        "audit": _audit(evaluated["audit"]),
        "model_kept": ledger.genesis["keep_models"],
        "limits": list(LIMITS),
    }


def receipt_markdown(receipt: Mapping) -> str:
    own, drift = receipt["scores"]["own"], receipt["drift"]
    verdict = receipt["verdict"]
    lines = [
        f"# Deletion request {receipt['request']}", "",
        f"Created {receipt['created_utc']} by unlearnlm {receipt['versions']['unlearnlm']}. Forget rows "
        f"{'redacted (sha256 and count only)' if receipt['redacted'] else 'NOT redacted (in receipt.json)'}.", "",
        markdown_table(["what", "value"], [
            ["forget set sha256", receipt["forget"]["sha256"]],
            ["forget rows", receipt["forget"]["rows"]],
            *[[f"weights before: {name}", digest] for name, digest in receipt["weights_sha256"]["before"].items()],
            *[[f"weights after: {name}", digest] for name, digest in receipt["weights_sha256"]["after"].items()],
            ["previous receipt sha256", receipt["previous_receipt_sha256"]],
            ["settings", f"{receipt['settings']['config'] or 'default'} {' '.join(receipt['settings']['overrides'])}"],
            ["verdict", "none (not a self-calibrating run)" if verdict is None else verdict["summary"]],
            *_calibration_rows(receipt),
            ["unlearning", f"{receipt['unlearning']['steps']} steps, {receipt['unlearning']['wall_seconds']:.1f} s "
                           f"training, {receipt['unlearning']['call_seconds']:.1f} s in all, "
                           f"{receipt['unlearning']['stopped_reason']}"],
        ]), "",
        "## This request on the new model", "",
        markdown_table(["forget score (higher = remembered)", "final", "task aggregate", "MIA score", "utility"],
                       [[fmt(own["forget_score"]), *(fmt(receipt["scores"][key]) for key in
                                                      ("final", "task_aggregate", "mia_score", "utility"))]]), "",
        "## Earlier requests on the new model", "",
        markdown_table(["request", "forget sha256", "forget score now", "right after its request",
                        "largest forget-term change", "came back (largest term fall)"],
                       [[entry["request"], entry["forget_sha256"][:16],
                         fmt(entry.get("forget_score")) if "unavailable" not in entry else entry["unavailable"],
                         fmt(entry.get("right_after_own_request", {}).get("forget_score")),
                         fmt(entry.get("largest_term_change")), fmt(entry.get("came_back"))]
                        for entry in receipt["earlier_requests"]])
        if receipt["earlier_requests"] else "None: this is the first request.", "",
        "## Drift from the original model", "",
        markdown_table(["score", "original", "now", "change"],
                       [[name, fmt(drift[key]["original"]), fmt(drift[key]["now"]), fmt(drift[key]["change"])]
                        for name, key in (("retain score", "retain_score"), ("utility", "utility"))]), "",
        "## Light audit (extraction attacks on this request's forget set)", "",
        markdown_table(["attack", "forget score", "without attack", "recovery"],
                       [[a["attack"], fmt(a["forget_score"]), fmt(a["forget_score_without_attack"]), fmt(a["recovery"])]
                        for a in receipt["audit"]["attacks"]]), "",
        "## Limits", "", *(f"- {limit}" for limit in receipt["limits"]), "",
    ]
    return "\n".join(lines)


def _calibration_rows(receipt: Mapping) -> list[list[str]]:
    rate, settling = receipt["calibration"], receipt["settling"]
    if rate is None:
        return []
    settled = ", ".join(map(str, settling["earlier_requests"])) or "none"
    skipped = ", ".join(map(str, settling["skipped"]))
    return [["rate", f"{rate['lr']:.3g} ({rate['source']})"],
            ["settled and checked with earlier requests", settled + (f"; skipped (unavailable): {skipped}" if skipped else "")]]


def _verdict_word(verdict: Mapping | None) -> str:
    return "-" if verdict is None else "forgotten" if verdict["forgotten"] else "NOT forgotten"


def show_rows(receipts: list[Mapping]) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of ``ledger show``: one row per request."""
    headers = ["request", "created (UTC)", "forget sha256", "rows", "forget score", "most came back (earlier)",
               "retain drift", "utility", "verdict", "model"]
    rows = []
    for number, receipt in enumerate(receipts, start=1):
        changes = [entry["came_back"] for entry in receipt["earlier_requests"] if entry.get("came_back") is not None]
        rows.append([str(receipt["request"]), receipt["created_utc"], receipt["forget"]["sha256"][:12],
                     str(receipt["forget"]["rows"]), fmt(receipt["scores"]["own"]["forget_score"], 3),
                     fmt(max(changes), 3) if changes else "-", fmt(receipt["drift"]["retain_score"]["change"], 3),
                     fmt(receipt["scores"]["utility"], 3), _verdict_word(receipt["verdict"]),
                     "current" if number == len(receipts) else "kept" if receipt["model_kept"] else "removed"])
    return headers, rows
