"""``run_audit``: every attack on the audited model (and on the oracle), scored by the official scoring.

An attack's result holds the official headline scores, the 12 (or fewer) aggregated terms, the raw
forget score (mean of the per-task forget scores, not inverted: higher means more is remembered),
the same score without the attack on the same rows, and the attack's budget. Attacks that change
the model (relearning, quantization) are evaluated in full (generations, MIA, utility); attacks that
change only the prompts or the decoding reuse the un-attacked model's MIA losses, utility and retain
generations, since those do not depend on the forget prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from unlearnlm.audit.attacks import (
    QUANTIZATION_SCHEMES,
    RelearnBudget,
    SamplingBudget,
    quantized_model,
    relearn,
    resolve_quantizer,
    sampled_best_rows,
    shortened,
    split_documents,
    with_document_context,
)
from unlearnlm.data.records import Record
from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, generation_rows, load_model, run_evaluation
from unlearnlm.evaluation.likelihood import TokenCache
from unlearnlm.evaluation.scoring import aggregated_terms, final_score, headline, official_results, task_aggregate
from unlearnlm.model import default_device

NO_ATTACK = "none"
# A prompt's samples share its length, so a batch of several prompts' samples adds little padding,
# and a decoding step's fixed cost is shared by more rows: on a bench model (one thread, 120 forget
# prompts, 8 samples each) batches of 64 rows decoded in 39 s against 54 s for batches of 16.
SAMPLING_BATCH_FACTOR = 4


@dataclass(frozen=True)
class AuditSettings:
    seed: int = 0
    relearn: RelearnBudget = field(default_factory=RelearnBudget)
    sampling: SamplingBudget = field(default_factory=SamplingBudget)
    prompt_fractions: tuple[float, ...] = (0.5, 0.25)
    bits: tuple[int, ...] = (8, 4)
    quantizer: str = "auto"  # attacks.QUANTIZERS; auto: bitsandbytes on a CUDA GPU when installed, else torchao
    batch_size: int = 16
    # Rows per batch of the sampled attack; None: SAMPLING_BATCH_FACTOR times batch_size.
    sampling_batch_size: int | None = None
    max_new_tokens: int = 256
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sampling_rows_per_batch(self) -> int:
        return self.sampling_batch_size or SAMPLING_BATCH_FACTOR * self.batch_size


Log = Callable[[str], None]


def labelled_terms(results: Mapping) -> dict[str, float]:
    """The aggregated terms of an official results dict, by label (forget terms inverted)."""
    summaries = {"forget": results["forget-set"], "retain": results["retain-set"]}
    return {term.label: term.value for term in aggregated_terms(summaries)}


def _rows_record(rows: Sequence[Mapping]) -> list[dict]:
    return [{key: row[key] for key in ("id", "task", "kind", "input", "output", "generation", "score")}
            for row in rows if row["split"] == "forget"]


def _summary(results: Mapping, attack: str, family: str, scored_on: str, budget: dict, before: float | None,
             seconds: float) -> dict:
    scores = headline(results)
    return {
        "attack": attack, "family": family, "scored_on": scored_on, "budget": budget,
        "scores": scores, "terms": labelled_terms(results),
        "forget_score": scores["forget_mean"],
        "forget_score_without_attack": scores["forget_mean"] if before is None else before,
        "recovery": 0.0 if before is None else scores["forget_mean"] - before,
        "seconds": round(seconds, 2),
        "rows": _rows_record(results["generations"]),
    }


def _with_forget_rows(base: Mapping, forget_rows: Sequence[Mapping]) -> dict:
    """Official results of the un-attacked model with its forget rows replaced (prompt-only attacks)."""
    retain_rows = [row for row in base["generations"] if row["split"] == "retain"]
    mia = base.get("mia")
    results = official_results(
        [*forget_rows, *retain_rows],
        member_losses=mia["member_losses"] if mia else None,
        nonmember_losses=mia["nonmember_losses"] if mia else None,
        utility=base.get("utility"),
    )
    results["generations"] = [*forget_rows, *retain_rows]
    return results


def best_rows(candidates: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Row by row, the candidate with the highest official score (the first one on a tie).

    ``candidates`` are lists of scored rows in the same row order (one list per prompt or decoding).
    """
    return [dict(max(column, key=lambda row: row["score"])) for column in zip(*candidates, strict=True)]


def _held_out(base: Mapping, held_out_ids: set[str]) -> dict:
    """The un-attacked model's results on V only: its generations of V's rows, rescored."""
    return _with_forget_rows(base, [row for row in base["generations"]
                                    if row["split"] == "forget" and row["id"] in held_out_ids])


Recorder = Callable[[str, str, str, dict, Mapping, float], None]
Candidates = dict[str, list[dict]]  # scored forget rows, by the variant of the attack that gave them


@dataclass(frozen=True)
class Attack:
    """One row of the audit's table of attacks.

    ``family``: extraction (new prompts or decoding on the loaded weights), quantization or relearning
    (new weights, from a fresh load of the model). ``scored_on``: F, every forget row, or V, the held-out
    half of the forget documents (the relearning on T). ``budget(settings)``: what it may spend, as the
    receipt shows it. What it runs: an extraction attack's ``candidates`` (the loaded model, its
    tokenizer, the data, the settings) give its variants' rows; a weight attack's ``attacked`` (the
    model's path, the rows it trains on, the settings) gives the attacked model, its tokenizer and the
    budget facts only known once it is built; ``trains_on``: the rows a relearning trains on (T: the
    other half of the forget documents, R: the retain set); ``bits``: a quantization's, run when
    ``settings.bits`` holds it.
    """

    name: str
    family: str
    scored_on: str
    budget: Callable[[AuditSettings], dict]
    candidates: Callable[..., Candidates] | None = None
    attacked: Callable[..., tuple] | None = None
    trains_on: str | None = None
    bits: int | None = None


def _eval_settings(settings: AuditSettings) -> EvalSettings:
    return EvalSettings(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)


def _sampled(model, tokenizer, data: EvalData, settings: AuditSettings) -> Candidates:
    return {"samples": sampled_best_rows(model, tokenizer, data.forget, settings.sampling, settings.seed,
                                         settings.sampling_rows_per_batch, settings.max_new_tokens, TokenCache())}


def _prompt_cut(model, tokenizer, data: EvalData, settings: AuditSettings) -> Candidates:
    return {f"last {fraction:.0%} of the prompt": generation_rows(
        model, tokenizer, EvalData(shortened(data.forget, fraction), []), _eval_settings(settings))
        for fraction in settings.prompt_fractions}


def _context(model, tokenizer, data: EvalData, settings: AuditSettings) -> Candidates:
    return {"with context": generation_rows(model, tokenizer, EvalData(with_document_context(data.forget), []),
                                            _eval_settings(settings))}


def _quantized(bits: int) -> Callable[..., tuple]:
    def attacked(path: str | Path, rows: Sequence[Record], settings: AuditSettings) -> tuple:
        quantizer = resolve_quantizer(settings.quantizer, default_device())
        model, tokenizer = quantized_model(path, bits, settings.dtype, quantizer)
        return model, tokenizer, {"bits": bits, "library": quantizer, "scheme": QUANTIZATION_SCHEMES[quantizer, bits],
                                  "quantized": "decoder linear layers"}

    return attacked


def _relearned(mode: str) -> Callable[..., tuple]:
    def attacked(path: str | Path, rows: Sequence[Record], settings: AuditSettings) -> tuple:
        model, tokenizer = load_model(path, settings.dtype)
        model = relearn(model, tokenizer, rows, mode, settings.relearn, settings.seed)
        return model, tokenizer, settings.relearn.describe(mode, model)

    return attacked


def _words(fractions: Sequence[float]) -> str:
    return "the whole prompt and its last " + ", ".join(f"{f:.0%}" for f in fractions) + " of words"


GREEDY = {"decoding": "greedy"}
ON_T, ON_RETAIN = {"data": "T (half of the forget documents)"}, {"data": "the retain set"}
# In the order the receipt lists them; extraction-any (no ``candidates``) takes every candidate of the
# extraction attacks before it.
ATTACKS: tuple[Attack, ...] = (
    Attack("sampled", "extraction", "F", lambda s: {**s.sampling.describe(), "also": "the greedy answer"}, _sampled),
    Attack("prompt-cut", "extraction", "F", lambda s: {"prompts": _words(s.prompt_fractions), **GREEDY}, _prompt_cut),
    Attack("context", "extraction", "F", lambda s: {
        "prompts": "each question alone and after its document's earlier text (the completion prompt)", **GREEDY},
        _context),
    Attack("extraction-any", "extraction", "F", lambda s: {"candidates": "every candidate of the three attacks above"}),
    *(Attack(f"quant-{bits}bit", "quantization", "F", lambda s: {}, attacked=_quantized(bits), bits=bits) for bits in (8, 4)),
    Attack("relearn-lora", "relearning", "V", lambda s: ON_T, attacked=_relearned("lora"), trains_on="T"),
    Attack("relearn-full", "relearning", "V", lambda s: ON_T, attacked=_relearned("full"), trains_on="T"),
    Attack("benign-retain", "relearning", "F", lambda s: ON_RETAIN, attacked=_relearned("full"), trains_on="R"),
)


def extraction_attacks(model, tokenizer, data: EvalData, base: Mapping, settings: AuditSettings,
                       record: Recorder) -> dict[str, dict[str, float]]:
    """The attacks that change only the prompts or the decoding, on the loaded model, each passed to
    ``record(name, family, scored_on, budget, results, started)``; returns each attack's variants'
    own forget scores, by attack.

    An attacker keeps whatever works, so each attack scores a row by its best candidate, the
    un-attacked greedy answer included (Patil et al. count an attack a success when any candidate
    holds the answer); each variant's own score is kept beside it.
    """
    greedy = [row for row in base["generations"] if row["split"] == "forget"]
    variants: dict[str, Candidates] = {}
    for attack in (attack for attack in ATTACKS if attack.family == "extraction"):
        since = time.perf_counter()
        if attack.candidates is not None:
            variants[attack.name] = attack.candidates(model, tokenizer, data, settings)
            rows = [greedy, *variants[attack.name].values()]
        else:
            rows = [greedy, *(rows for candidates in variants.values() for rows in candidates.values())]
        record(attack.name, attack.family, attack.scored_on, attack.budget(settings),
               _with_forget_rows(base, best_rows(rows)), since)
    return {name: {label: headline(_with_forget_rows(base, rows))["forget_mean"] for label, rows in candidates.items()}
            for name, candidates in variants.items()}


def _recorder(attacks: dict[str, dict], before: Mapping[str, float], log: Log) -> Recorder:
    """What records an attack's results in ``attacks``, against the un-attacked forget score of the
    rows it is scored on (``before``: by ``scored_on``)."""
    def record(name: str, family: str, scored_on: str, budget: dict, results: Mapping, since: float) -> None:
        without = before[scored_on]
        attacks[name] = _summary(results, name, family, scored_on, budget, without, time.perf_counter() - since)
        log(f"{name}: forget {attacks[name]['forget_score']:.3f} (without attack {without:.3f})")

    return record


def extraction_audit(model, tokenizer, data: EvalData, base: Mapping, settings: AuditSettings,
                     log: Log = lambda message: None, base_seconds: float = 0.0) -> dict[str, dict]:
    """The loaded model without attack (``base``: its results on ``data``) and under the extraction
    attacks, by attack name: the light audit, which leaves the weights alone."""
    attacks = {NO_ATTACK: _summary(base, NO_ATTACK, NO_ATTACK, "F", {"decoding": "greedy"}, None, base_seconds)}
    before = attacks[NO_ATTACK]["forget_score"]
    log(f"{NO_ATTACK}: forget {before:.3f}")
    record = _recorder(attacks, {"F": before}, log)
    for name, variants in extraction_attacks(model, tokenizer, data, base, settings, record).items():
        attacks[name]["variants"] = variants
    return attacks


def audit_one(path: str | Path, data: EvalData, train_half: Sequence[Record], held_out: Sequence[Record],
              settings: AuditSettings, log: Log = lambda message: None, base: Mapping | None = None) -> dict[str, dict]:
    """Every attack of ``ATTACKS`` on the model at ``path`` (only read; each weight attack starts from a
    fresh load).

    ``base``: the model's un-attacked results on ``data`` with these settings, when the caller has them
    already (the bench scores every reported model before auditing it); computed here otherwise.
    """
    def evaluate(model, tokenizer, forget: Sequence[Record]) -> dict:
        return run_evaluation(model, tokenizer, replace(data, forget=forget), _eval_settings(settings))

    started = time.perf_counter()
    model, tokenizer = load_model(path, settings.dtype)
    if base is None:
        base = evaluate(model, tokenizer, data.forget)
    attacks = extraction_audit(model, tokenizer, data, base, settings, log, time.perf_counter() - started)
    del model
    record = _recorder(attacks, {"F": attacks[NO_ATTACK]["forget_score"],
                                 "V": headline(_held_out(base, {row.id for row in held_out}))["forget_mean"]}, log)
    training = {"T": train_half, "R": data.retain}
    for attack in ATTACKS:
        if attack.attacked is None or (attack.bits is not None and attack.bits not in settings.bits):
            continue
        since = time.perf_counter()
        rows = training.get(attack.trains_on, ())
        model, tokenizer, facts = attack.attacked(path, rows, settings)
        budget = {**facts, **attack.budget(settings), **({"rows": len(rows)} if attack.trains_on else {})}
        record(attack.name, attack.family, attack.scored_on, budget,
               evaluate(model, tokenizer, held_out if attack.scored_on == "V" else data.forget), since)
        del model
    return attacks


def worst_case(attacks: Mapping[str, Mapping]) -> dict:
    """Each term's worst (lowest) value over the attacks, and the scores built from them.

    The robust task aggregate is the harmonic mean of the worst terms (an attacker may use a
    different attack for each term), robust MIA and utility are the lowest over the attacks, and the
    robust final is their mean, as the official final is.
    """
    worst: dict[str, dict] = {}
    for name, attack in attacks.items():
        for label, value in attack["terms"].items():
            if label not in worst or value < worst[label]["value"]:
                worst[label] = {"value": value, "attack": name}
    aggregate = task_aggregate([entry["value"] for entry in worst.values()])

    def lowest(key: str) -> dict | None:
        values = [(attack["scores"][key], name) for name, attack in attacks.items()]
        if any(value is None for value, _ in values):
            return None
        value, name = min(values)
        return {"value": value, "attack": name}

    mia, utility = lowest("mia_score"), lowest("utility")
    final = final_score(aggregate, mia and mia["value"], utility and utility["value"])
    plain = attacks[NO_ATTACK]["scores"]
    return {"terms": worst, "task_aggregate": aggregate, "mia_score": mia, "utility": utility, "final": final,
            "plain": {"final": plain["final"], "task_aggregate": plain["task_aggregate"],
                      "mia_score": plain["mia_score"], "utility": plain["utility"]}}


def oracle_comparison(audited: Mapping[str, Mapping], oracle: Mapping[str, Mapping]) -> list[dict]:
    """Per attack: the audited model's raw forget score and recovery beside the oracle's.

    The oracle never saw F, so what it reaches under an attack is what the attack gives any model;
    the audited model's excess over it is the leak.
    """
    return [{
        "attack": name,
        "audited_forget": audited[name]["forget_score"], "oracle_forget": oracle[name]["forget_score"],
        "audited_recovery": audited[name]["recovery"], "oracle_recovery": oracle[name]["recovery"],
        "excess_forget": audited[name]["forget_score"] - oracle[name]["forget_score"],
        "excess_recovery": audited[name]["recovery"] - oracle[name]["recovery"],
    } for name in audited if name in oracle]


def run_audit(model: str | Path, data: EvalData, original: str | Path | None = None,
              oracle: str | Path | None = None, settings: AuditSettings | None = None, log: Log = lambda message: None) -> dict:
    """The whole audit as a dict (what ``receipt.json`` is written from; the bench can call it too)."""
    settings = settings or AuditSettings()
    started = time.perf_counter()
    train_half, held_out = split_documents(data.forget, settings.seed)
    audit: dict = {
        "settings": settings.to_dict(),
        "split": {
            "seed": settings.seed,
            "train_documents": sorted({row.document_id for row in train_half}),
            "held_out_documents": sorted({row.document_id for row in held_out}),
            "train_rows": len(train_half), "held_out_rows": len(held_out),
        },
        "models": {},
    }
    if original is not None:
        since = time.perf_counter()
        loaded, tokenizer = load_model(original, settings.dtype)
        results = run_evaluation(loaded, tokenizer, data,
                                 EvalSettings(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens))
        audit["models"]["original"] = {"path": str(original), "attacks": {
            NO_ATTACK: _summary(results, NO_ATTACK, NO_ATTACK, "F", {"decoding": "greedy"}, None, time.perf_counter() - since)}}
        del loaded
        log(f"original: final {audit['models']['original']['attacks'][NO_ATTACK]['scores']['final']}")
    log(f"audited model: {model}")
    audit["models"]["audited"] = {"path": str(model), "attacks": audit_one(model, data, train_half, held_out, settings, log)}
    if oracle is not None:
        log(f"oracle: {oracle}")
        audit["models"]["oracle"] = {"path": str(oracle), "attacks": audit_one(oracle, data, train_half, held_out, settings, log)}
        models = audit["models"]
        audit["oracle_comparison"] = oracle_comparison(models["audited"]["attacks"], models["oracle"]["attacks"])
    audit["worst_case"] = worst_case(audit["models"]["audited"]["attacks"])
    audit["seconds"] = round(time.perf_counter() - started, 1)
    return audit
