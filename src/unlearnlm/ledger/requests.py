"""Creating a ledger and adding a request to it: unlearn the request's forget set from the current
model, score it and every earlier request on the new model, run the light audit, chain the receipt.

The ledger refers to its data by path (or Hub split) and sha256; it copies none of it. A request's
forget set is the sensitive data, so the ledger keeps only where it was read
(``forget_reference.json``, outside the hash chain, so the file may be moved and the locator
updated) and its sha256 (in the receipt). Later requests re-read it there to check that it stays
forgotten; once the owner deletes the file, later receipts record that request as unavailable
instead of re-scoring it (docs/ledger.md).

With ``--config auto``, a request trains at the rate the last calibration of the ledger probed (the
model it starts from differs from the one probed by small updates only; ``recalibrate`` probes
again), and its settling passes and held-out check cover the forget sets of every earlier request
still available, so that what this request moves of them is pulled back to the level and judged.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from unlearnlm.data.raw import DEFAULT_TEXT_KEY, Rows, read_rows, refuse_shared_rows
from unlearnlm.data.records import content_sha256
from unlearnlm.errors import UserError
from unlearnlm.ledger.receipt import build_receipt, receipt_markdown
from unlearnlm.ledger.store import (
    FORMAT,
    GENESIS,
    MODEL,
    RECEIPT_JSON,
    RECEIPT_MD,
    REFERENCE,
    Ledger,
    LedgerMismatch,
    commit,
    locked,
    open_ledger,
    read_json,
    remove_earlier_models,
    self_sha256,
    verify,
    write_json,
)

if TYPE_CHECKING:
    from unlearnlm.config import UnlearnConfig

Log = Callable[[str], None]
STAGED = "request"  # inside the pending directory: the request directory being made, model and receipt


def _reference(value: str | Path) -> str:
    """How the ledger finds a data set again: an absolute path, or the Hub split as written."""
    if not isinstance(value, (str, Path)):
        raise UserError("the ledger refers to its data by path or Hub split: write the rows to a file first")
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def _data_entry(value: str | Path | None, rows: int) -> dict | None:
    if value is None:
        return None
    reference = _reference(value)
    return {"reference": reference, "sha256": content_sha256(reference), "rows": rows}


def _checked(entry: dict, role: str) -> str:
    """A data set recorded at init, refused if its content changed since (the drift would mean nothing)."""
    try:
        found = content_sha256(entry["reference"])
    except (OSError, UserError):
        found = None
    if found != entry["sha256"]:
        raise UserError(f"{entry['reference']}: the ledger's {role} set is missing or changed since `ledger init` "
                        f"(sha256 {found} instead of {entry['sha256']})")
    return entry["reference"]


def init_ledger(model: str | Path, retain: str | Path, unseen: str | Path, out: str | Path, *,
                utility: str | Path | None = None, keep_models: bool = False, text_key: str = DEFAULT_TEXT_KEY,
                batch_size: int = 16, max_new_tokens: int = 256) -> dict:
    """Start a ledger at ``out`` for ``model`` (only read, referenced by path and weight hashes), with
    the retain set R, unseen documents U (the MIA's nonmembers) and optionally a general set G
    (utility). The original model's retain and utility scores are recorded: later requests' drift
    is measured against them. Returns the genesis record (``ledger.json``)."""
    from unlearnlm.auto.unseen import read_unseen, refuse_shared
    from unlearnlm.evaluation.inputs import load_general_set
    from unlearnlm.hub import resolve_model
    from unlearnlm.paths import check_output_dir

    if (Path(out) / GENESIS).is_file():
        raise UserError(f"{out}: already a ledger (add a request with `unlearnlm ledger add {out} --forget F`)")
    source = resolve_model(model)
    retain_rows = read_rows(retain, "retain", text_key)
    # U as --config auto, every add's default, needs it: at least 4 documents, each once, none of R's text.
    unseen_documents = read_unseen(unseen, text_key)
    refuse_shared(unseen_documents, [("retain", retain_rows)])
    general = load_general_set(utility) if utility is not None else None
    out = check_output_dir(out, False, inputs=[source.path, retain, unseen, utility])
    if source.is_adapter:
        raise UserError(f"{source.spec}: a ledger starts from a whole model (merge the adapter first)")
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "text_key": text_key}
    scores = _original_scores(source.path, retain_rows, general, settings)
    genesis = {
        "format": FORMAT,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "original": source.record(),
        "retain": _data_entry(retain, len(retain_rows)),
        "unseen": _data_entry(unseen, len(unseen_documents)),
        "general": _data_entry(utility, len(general) if general else 0),
        "keep_models": keep_models,
        "evaluation": settings,
        "original_scores": scores,
    }
    with locked(out):
        if (out / GENESIS).exists():
            raise UserError(f"{out}: a ledger was created there meanwhile")
        write_json(genesis, out / GENESIS)
    return genesis


def _eval_settings(settings: dict):
    from unlearnlm.evaluation.evaluator import EvalSettings

    return EvalSettings(batch_size=settings["batch_size"], max_new_tokens=settings["max_new_tokens"])


def _original_scores(model_dir: Path, retain_rows: Rows, general, settings: dict) -> dict:
    from unlearnlm.evaluation.evaluator import EvalData, load_model, run_evaluation
    from unlearnlm.evaluation.scoring import headline

    model, tokenizer = load_model(model_dir)
    results = run_evaluation(model, tokenizer, EvalData([], retain_rows.for_evaluation(), general=general),
                             _eval_settings(settings))
    return _retain_side(results, headline(results))


def _retain_side(results: dict, scores: dict) -> dict:
    from unlearnlm.audit.run import labelled_terms

    return {"retain_score": scores["retain_mean"], "utility": scores["utility"],
            "retain_terms": {label: value for label, value in labelled_terms(results).items()
                             if label.startswith("retain")}}


def forget_scores(model, tokenizer, rows: Sequence, settings: dict) -> dict:
    """A forget set's raw score (mean of its per-task scores: higher = more remembered) and its
    forget terms (1 - score, as the official aggregate counts them), from greedy generations of its
    rows alone, so that a request is scored the same way right after it and in every later receipt."""
    from unlearnlm.audit.run import labelled_terms
    from unlearnlm.evaluation.evaluator import EvalData, generation_rows
    from unlearnlm.evaluation.scoring import headline, official_results

    results = official_results(generation_rows(model, tokenizer, EvalData(list(rows), []), _eval_settings(settings)))
    return {"forget_score": headline(results)["forget_mean"], "forget_terms": labelled_terms(results)}


def _earlier_forget_set(ledger: Ledger, number: int, text_key: str) -> tuple[Rows | None, str | None]:
    """Request ``number``'s forget rows, or why they cannot be re-scored."""
    recorded = ledger.receipt(number)["forget"]["sha256"]
    try:
        reference = read_json(ledger.request_dir(number) / REFERENCE)["forget"]
        rows = read_rows(reference, "forget", text_key)
    except (LedgerMismatch, UserError, OSError, KeyError) as err:
        return None, f"its forget set cannot be read ({' '.join(str(err).split())})"
    if rows.sha256 != recorded:
        return None, f"the file at its reference now has sha256 {rows.sha256}, not the request's"
    return rows, None


def _refuse_request(ledger: Ledger, forget_rows: Rows, earlier: dict[int, tuple], auto: bool, text_key: str) -> None:
    """What would make the request fail or mean nothing, refused before any of its work is written: the
    forget set of an earlier request again (while that request's own file is there), a forget set sharing
    rows with R, or text with U (the MIA's nonmembers and auto's level would read the request itself)."""
    from unlearnlm.auto.unseen import read_unseen, refuse_overlap
    from unlearnlm.evaluation.inputs import load_mia_documents

    for number, (rows, _) in earlier.items():  # still available: re-scored, and settled by auto, with every request
        if rows is not None and rows.sha256 == forget_rows.sha256:
            raise UserError(f"{forget_rows.source}: the same forget set as request {number} (sha256 "
                            f"{forget_rows.sha256[:12]}), already unlearned; later receipts re-score it")
    retain_rows = read_rows(_checked(ledger.genesis["retain"], "retain"), "retain", text_key)
    refuse_shared_rows(forget_rows, retain_rows)
    unseen = _checked(ledger.genesis["unseen"], "unseen")
    documents = read_unseen(unseen, text_key) if auto else load_mia_documents(unseen, "nonmembers", text_key)
    refuse_overlap(documents, forget_rows, retain_rows, [rows for rows, _ in earlier.values() if rows is not None])


def _pending(ledger: Ledger, key: dict, log: Log) -> Path:
    """The work directory of this request: kept from an interrupted ``add`` of the same request (to
    resume it), else fresh."""
    pending = ledger.pending_dir
    if pending.exists():
        try:
            same = read_json(pending / "request.json") == key
        except LedgerMismatch:
            same = False
        if not same:
            log(f"discarding the unfinished work of another request in {pending}")
            shutil.rmtree(pending)
    pending.mkdir(exist_ok=True)
    write_json(key, pending / "request.json")
    return pending


def _without_rate(config: dict) -> dict:
    return {**config, "optim": {**config["optim"], "lr": None}, "auto": {**config["auto"], "rate": None}}


def _rate_source(ledger: Ledger, config: UnlearnConfig, recalibrate: bool) -> str | None:
    """Where a self-calibrating request's rate comes from: ``"settings"`` (``auto.rate`` given),
    ``"request K"`` (the rate request K probed with the same settings otherwise: ``config.auto.rate``
    is set to it) or ``"probed"``; None for a preset."""
    if not config.auto.enabled:
        return None
    if config.auto.rate is not None:
        return "settings"
    if recalibrate:
        return "probed"
    wanted = _without_rate(config.to_dict())
    for number in range(ledger.count(), 0, -1):
        receipt = ledger.receipt(number)
        calibration = receipt.get("calibration") or {}
        if calibration.get("source") == "probed" and _without_rate(receipt["settings"]["resolved"]) == wanted:
            config.auto.rate = calibration["lr"]
            return f"request {number}"
    return "probed"


def _unlearn(ledger: Ledger, pending: Path, reference: str, config: UnlearnConfig, show_progress: bool,
             earlier: Sequence[str]) -> dict:
    """Unlearn into the staged request directory's ``model/``, continuing an interrupted run of the same
    request; a self-calibrating run also settles and checks the ``earlier`` forget sets."""
    from unlearnlm.api import unlearn
    from unlearnlm.paths import partial_dir_for
    from unlearnlm.runstate import recover_checkpoint

    out = pending / STAGED / MODEL
    if (out / "run.json").is_file():
        return read_json(out / "run.json")
    partial = partial_dir_for(out.resolve())
    resume = partial.exists() and recover_checkpoint(partial / "state")
    # A self-calibrating run reads the ledger's unseen documents U: its level, and its held-out check.
    unseen = _checked(ledger.genesis["unseen"], "unseen") if config.auto.enabled else None
    return unlearn(ledger.current_model(), reference, _checked(ledger.genesis["retain"], "retain"), out, config,
                   unseen=unseen, forgotten_before=earlier if unseen else (),
                   text_key=ledger.genesis["evaluation"]["text_key"], resume=resume,
                   overwrite=partial.exists() and not resume, show_progress=show_progress, redact=True)


def _evaluate(ledger: Ledger, model_dir: Path, forget_rows: Rows, earlier: dict[int, tuple], log: Log) -> dict:
    """Every score a receipt holds, from one load of the new model."""
    from unlearnlm.audit.run import AuditSettings, extraction_audit, labelled_terms, worst_case
    from unlearnlm.evaluation.evaluator import EvalData, load_model, run_evaluation
    from unlearnlm.evaluation.inputs import load_general_set, load_mia_documents, set_documents
    from unlearnlm.evaluation.scoring import headline

    genesis, settings = ledger.genesis, ledger.genesis["evaluation"]
    text_key = settings["text_key"]
    members = set_documents(forget_rows) or None
    data = EvalData(forget_rows.for_evaluation(),
                    read_rows(_checked(genesis["retain"], "retain"), "retain", text_key).for_evaluation(),
                    members, load_mia_documents(_checked(genesis["unseen"], "unseen"), "nonmembers", text_key)
                    if members else None,
                    load_general_set(_checked(genesis["general"], "general")) if genesis["general"] else None)
    model, tokenizer = load_model(model_dir)
    results = run_evaluation(model, tokenizer, data, _eval_settings(settings))
    log("scored the new model; auditing it with the extraction attacks")
    audit_settings = AuditSettings(batch_size=settings["batch_size"], max_new_tokens=settings["max_new_tokens"])
    attacks = extraction_audit(model, tokenizer, data, results, audit_settings, log)
    scores = headline(results)
    evaluated = {
        "own": forget_scores(model, tokenizer, data.forget, settings),
        "headline": {key: scores[key] for key in ("final", "task_aggregate", "mia_score", "mia_auc", "utility")},
        "terms": labelled_terms(results),
        "retain_side": _retain_side(results, scores),
        "audit": {"settings": audit_settings.to_dict(), "attacks": attacks, "worst_case": worst_case(attacks)},
        "earlier": {},
    }
    for number, (rows, reason) in earlier.items():
        evaluated["earlier"][number] = forget_scores(model, tokenizer, rows.for_evaluation(), settings) \
            if rows is not None else {"unavailable": reason}
    return evaluated


def add_request(ledger_dir: str | Path, forget: str | Path, config: str | None = "auto", *,
                overrides: Sequence[str] = (), recalibrate: bool = False, redact: bool = True,
                show_progress: bool = True, log: Log = lambda message: None) -> dict:
    """Unlearn ``forget`` from the ledger's current model, make the result current and write the
    request's receipt; returns the receipt as written. With ``--config auto`` the rate the ledger's
    last calibration probed is reused unless ``recalibrate``. A second ``add`` while one runs is refused; an ``add``
    killed midway leaves the ledger as it was, and the same ``add`` again continues its work."""
    from unlearnlm.config import load_config

    ledger = open_ledger(ledger_dir)
    text_key = ledger.genesis["evaluation"]["text_key"]
    resolved = load_config(config, list(overrides))  # a bad setting fails before anything is locked or read
    if recalibrate and not resolved.auto.enabled:
        raise UserError("--recalibrate: only --config auto calibrates a rate")
    if recalibrate and resolved.auto.rate is not None:
        raise UserError("--recalibrate probes the rate again: leave out auto.rate")
    reference = _reference(forget)
    forget_rows = read_rows(reference, "forget", text_key)
    with locked(ledger.root):
        remove_earlier_models(ledger)  # finishes a commit that a kill interrupted
        verify(ledger.root)  # the next receipt vouches for the weights it starts from
        number = ledger.count() + 1
        earlier = {i: _earlier_forget_set(ledger, i, text_key) for i in range(1, number)}
        available = [i for i, (rows, _) in earlier.items() if rows is not None]
        _refuse_request(ledger, forget_rows, earlier, resolved.auto.enabled, text_key)
        key = {"request": number, "forget_sha256": forget_rows.sha256, "config": config, "overrides": list(overrides),
               "previous_receipt_sha256": ledger.last_receipt_sha256(),
               "rate_source": _rate_source(ledger, resolved, recalibrate), "settled_with": available}
        pending = _pending(ledger, key, log)
        log(f"request {number}: unlearning {len(forget_rows)} rows from {ledger.current_model()} (rate: "
            f"{key['rate_source'] or 'the preset'}; earlier requests settled: {available or 'none'})")
        started = time.perf_counter()
        # The whole call (a calibration, loading and saving included; after a kill, the resumed part only).
        run = {**_unlearn(ledger, pending, reference, resolved, show_progress,
                          [earlier[i][0].source for i in available]),
               "call_seconds": round(time.perf_counter() - started, 3)}
        evaluated = _evaluate(ledger, pending / STAGED / MODEL, forget_rows, earlier, log)
        receipt = build_receipt(ledger, number, key, forget_rows, run, evaluated, redact)
        staged = pending / STAGED
        (staged / RECEIPT_MD).write_text(receipt_markdown(receipt), encoding="utf-8")
        receipt["receipt_md_sha256"] = content_sha256(staged / RECEIPT_MD)
        receipt["self_sha256"] = self_sha256(receipt)
        write_json({"forget": reference}, staged / REFERENCE)
        write_json(receipt, staged / RECEIPT_JSON)
        commit(ledger, staged, number)
        shutil.rmtree(pending)
    return ledger.receipt(number)
