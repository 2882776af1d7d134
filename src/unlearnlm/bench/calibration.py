"""The calibration of the tiny benchmark's models (docs/benchmark.md): the bars a target, its oracle
and their base must meet, scored as the benchmark scores them. A draw whose models miss a bar is an
error, not a benchmark.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from unlearnlm.bench.base import load_base
from unlearnlm.data.sets import BenchmarkSets
from unlearnlm.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class Bars:
    """The calibration (docs/benchmark.md). MIA bars apply only from ``min_mia_docs`` members on:
    with fewer, the AUC takes so few values that it says nothing about the models."""

    memorized: float = 0.9  # each of the target's 12 per-task means, and its utility
    retained: float = 0.9  # the oracle's 6 retain means, and its utility
    target_auc: float = 0.9
    oracle_mia: float = 0.6
    oracle_forget_share: float = 0.5  # the oracle's mean forget term at most this share of the target's
    nonmember_ratio: float = 1.5  # the target's nonmember loss at most this many times the base's
    min_mia_docs: int = 8


BARS = Bars()


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    bound: float
    at_least: bool  # True: value >= bound passes; False: value <= bound passes

    @property
    def passed(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def describe(self) -> str:
        relation = ">=" if self.at_least else "<="
        return f"{self.name} = {self.value:.3f}, needs {relation} {self.bound:.3f} (off by {abs(self.value - self.bound):.3f})"


def model_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, sets: BenchmarkSets,
                 full: bool) -> dict:
    """The benchmark's scores of one model; ``full=False`` is the MIA losses alone (the base)."""
    from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, run_evaluation
    from unlearnlm.evaluation.mia import run_mia
    from unlearnlm.evaluation.scoring import aggregated_terms, headline

    members = [document.text() for document in sets.mia_members]
    nonmembers = [document.text() for document in sets.mia_nonmembers]
    if not full:
        mia = run_mia(model, tokenizer, members, nonmembers, suite=False)
    else:
        data = EvalData(sets.rows(sets.forget), sets.rows(sets.retain), members, nonmembers, sets.rows(sets.general))
        results = run_evaluation(model, tokenizer, data, EvalSettings(mia_suite=False))
        mia = results["mia"]
        summaries = {"forget": results["forget-set"], "retain": results["retain-set"]}
        # Raw per-task means: the bars are on what a model recalls, so the forget terms are not inverted.
        raw = {term.label: 1 - term.value if term.split == "forget" else term.value for term in aggregated_terms(summaries)}
        scores = {**{key: value for key, value in headline(results).items() if key != "mmlu"}, "terms": raw}
    losses = {"member_loss": statistics.mean(mia["member_losses"]),
              "nonmember_loss": statistics.mean(mia["nonmember_losses"]),
              "member_losses": mia["member_losses"], "nonmember_losses": mia["nonmember_losses"]}
    return {**scores, **losses} if full else losses


def calibration_checks(scores: dict[str, dict], mia_docs: int, bars: Bars = BARS) -> list[Check]:
    """Every bar of the calibration on the scores of ``base``, ``target`` and ``oracle`` (the oracle's
    bars only when it was built)."""
    target, oracle, base = scores["target"], scores.get("oracle"), scores["base"]
    checks = [Check(f"target {name}", value, bars.memorized, True) for name, value in target["terms"].items()]
    checks.append(Check("target utility", target["utility"], bars.memorized, True))
    checks.append(Check("target nonmember loss", target["nonmember_loss"],
                        bars.nonmember_ratio * base["nonmember_loss"], False))
    if mia_docs >= bars.min_mia_docs:
        checks.append(Check("target MIA AUC", target["mia_auc"], bars.target_auc, True))
    if oracle is None:
        return checks
    checks += [Check(f"oracle {name}", value, bars.retained, True)
               for name, value in oracle["terms"].items() if "retain" in name]
    checks.append(Check("oracle utility", oracle["utility"], bars.retained, True))
    forget_mean = {name: statistics.mean(v for k, v in model["terms"].items() if "forget" in k)
                   for name, model in (("target", target), ("oracle", oracle))}
    checks.append(Check("oracle mean forget term", forget_mean["oracle"],
                        bars.oracle_forget_share * forget_mean["target"], False))
    if mia_docs >= bars.min_mia_docs:
        checks.append(Check("oracle MIA score", oracle["mia_score"], bars.oracle_mia, True))
    return checks


def calibration_record(base_dir: Path, target: torch.nn.Module, oracle: torch.nn.Module | None,
                       tokenizer: PreTrainedTokenizerFast, sets: BenchmarkSets, label: str, score: bool = True) -> dict:
    """The calibration record of the set manifest: the base (at ``base_dir``), the target and the oracle
    (``None``: not built) scored on ``sets`` and every bar checked (``score=False``: none). Raises
    ``UserError`` naming each bar ``label``'s models missed and by how much."""
    scores, checks = {}, []
    if score:
        base_model, _ = load_base(base_dir)
        scores = {"base": model_scores(base_model, tokenizer, sets, full=False),
                  "target": model_scores(target, tokenizer, sets, full=True)}
        if oracle is not None:
            scores["oracle"] = model_scores(oracle, tokenizer, sets, full=True)
        checks = calibration_checks(scores, len(sets.mia_members))
    failures = [check.describe() for check in checks if not check.passed]
    if failures:
        raise UserError(f"the {label} failed calibration: {'; '.join(failures)}")
    return {"scores": scores, "checks": [{**asdict(check), "passed": check.passed} for check in checks],
            "mia_checked": len(sets.mia_members) >= BARS.min_mia_docs}
