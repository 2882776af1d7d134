"""What the bench reads from one model, each kept in a record so that a rerun reuses it: the official
scores with the bootstrap's inputs, the forget level (the loss on text seen only in pretraining) and
``unlearnlm audit``'s attacks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from unlearnlm.paths import write_aside

LEVEL_DOCUMENTS = 32


def forget_level(target: Path, batch_size: int, model: Path | None = None) -> float:
    """The target's (or ``model``'s) mean loss per token on pretraining text that none of the
    target's sets holds: the level of text it has seen only in pretraining, as the MIA nonmembers,
    and so where a forgotten document should end.

    Read from a seeded sample of the pool's Task3 biographies outside every set (Task1 and Task2
    pool rows are too few and too repetitive to stand for unseen text); no set, and not the oracle,
    is used.
    """
    import random

    from unlearnlm.data.sets import MIA_TASK, pretraining_pool
    from unlearnlm.evaluation import mia
    from unlearnlm.model import load_model_and_tokenizer

    manifest = json.loads((target / "benchmark" / "manifest.json").read_text())
    in_sets = {doc for entry in manifest["files"].values() for doc in entry["documents"]}
    outside = [doc.text() for doc in pretraining_pool() if doc.task == MIA_TASK and doc.id not in in_sets]
    sample = random.Random("forget-level").sample(outside, min(LEVEL_DOCUMENTS, len(outside)))
    loaded, tokenizer = load_model_and_tokenizer(model or target)
    return mia.mean_document_loss(loaded, tokenizer, sample, batch_size)


def retain_set(target: Path) -> Path:
    """The retain set a bench target was built with, which every unlearning run of that target uses."""
    return target / "benchmark" / "retain.jsonl"


def evaluation_data(target: Path):
    from unlearnlm.data.records import load_documents, load_records
    from unlearnlm.evaluation.evaluator import EvalData

    sets = target / "benchmark"
    return EvalData(load_records(sets / "forget.jsonl", "forget"), load_records(retain_set(target), "retain"),
                    load_documents(sets / "mia_members.jsonl"), load_documents(sets / "mia_nonmembers.jsonl"),
                    load_records(sets / "general.jsonl", "retain"))


def score(model_dir: Path, data, batch_size: int, full: bool, keep: Path | None = None) -> dict:
    """Headline scores and the 12 terms; ``full`` adds the MIA attack suite and what the bootstrap needs.
    ``keep``: where to write the whole results (generations included), which the audit starts from."""
    from unlearnlm.evaluation.bootstrap import bootstrap_inputs
    from unlearnlm.evaluation.evaluator import EvalSettings, evaluate_paths
    from unlearnlm.evaluation.scoring import headline

    (_, results), = evaluate_paths([model_dir], data, EvalSettings(batch_size=batch_size, mia_suite=full))
    scores = {**headline(results), "terms": dict(zip(results["aggregated-term-labels"], results["aggregated-terms"])),
              "mia_auc": results.get("mia_loss_acc")}
    if full:
        scores["bootstrap"] = bootstrap_inputs(results)
    if keep is not None:
        write_aside(keep, json.dumps(results))
    return scores


def cached(record_path: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``, or what a record at ``record_path`` with the same ``key`` holds; written aside and
    renamed, since bench processes share the directory."""
    key = json.loads(json.dumps(key))  # as JSON reads it back (tuples become lists), so keys compare equal
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["key"] == key:
            return record["value"]
    value = compute()
    write_aside(record_path, json.dumps({"key": key, "value": value}))
    return value


def audited(model_dir: Path, data, record_path: Path, batch_size: int, kept: Path | None = None) -> dict:
    """``unlearnlm audit``'s attacks on one model, as its per-attack forget scores and its worst case;
    reused from ``record_path`` when that model was audited already. The un-attacked results are read
    from ``kept`` when the reported scoring left them there (same rows, batch size and decoding)."""
    from unlearnlm.audit.run import NO_ATTACK, AuditSettings, audit_one, split_documents, worst_case

    settings = AuditSettings(batch_size=batch_size)

    def attack() -> dict:
        train_half, held_out = split_documents(data.forget, settings.seed)
        started = time.perf_counter()
        base = json.loads(kept.read_text()) if kept is not None and kept.is_file() else None
        attacks = audit_one(model_dir, data, train_half, held_out, settings, base=base)
        return {"attacks": {name: {"forget_score": attack["forget_score"], "recovery": attack["recovery"],
                                   "final": attack["scores"]["final"], "scored_on": attack["scored_on"]}
                            for name, attack in attacks.items() if name != NO_ATTACK},
                "worst_case": worst_case(attacks), "seconds": time.perf_counter() - started}

    return cached(record_path, {"model": str(model_dir), "settings": settings.to_dict()}, attack)


