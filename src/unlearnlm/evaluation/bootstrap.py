"""Confidence intervals over documents: how much a score owes to which documents were drawn.

The percentile bootstrap (Efron and Tibshirani, "An Introduction to the Bootstrap", 1993): each
replicate redraws, with replacement, the documents of every (split, task) stratum of the forget and
retain sets, the MIA members and nonmembers, and the general set's documents per task; rows go with
their document, as the benchmark draws whole documents. The final score is recomputed exactly as
``scoring`` computes it. Runs on the same sets (seeds of one method) share each replicate's draw, so
the interval is that of their mean.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unlearnlm.evaluation.scoring import KNOWLEDGE, METRIC_OF_KIND, REGURGITATION, mia_score, task_aggregate

REPLICATES = 1000


def bootstrap_inputs(results: Mapping) -> dict:
    """What a replicate needs from one evaluation, small enough to keep in a results file."""
    return {
        "rows": [[row["id"][:-3], row["split"], row["task"], row["kind"], row["score"]] for row in results["generations"]],
        "member_losses": results["mia"]["member_losses"],
        "nonmember_losses": results["mia"]["nonmember_losses"],
        "utility": [[item["id"][:-3], int(item["predicted"] == item["answer"])]
                    for item in results["utility_details"]["predictions"]],
    }


def _strata(keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """Documents of each stratum, in first-seen order."""
    strata: dict[tuple[str, str], list[str]] = {}
    for stratum, document in keys:
        if document not in strata.setdefault(stratum, []):
            strata[stratum].append(document)
    return strata


def _resample(strata: Mapping, rng: random.Random) -> dict:
    return {stratum: rng.choices(documents, k=len(documents)) for stratum, documents in strata.items()}


@dataclass(frozen=True)
class DocumentDraw:
    """One replicate's documents: per (split, task) stratum of F and R, the MIA members and nonmembers
    (by index), and the general set's documents."""

    rows: Mapping[tuple[str, str], Sequence[str]]
    members: Sequence[int]
    nonmembers: Sequence[int]
    utility: Mapping[tuple[str, str], Sequence[str]]


@dataclass(frozen=True)
class EvaluationDocuments:
    """The documents of one draw's evaluation sets, which every model scored on that draw shares."""

    rows: Mapping[tuple[str, str], Sequence[str]]
    members: int
    nonmembers: int
    utility: Mapping[tuple[str, str], Sequence[str]]

    @classmethod
    def of(cls, inputs: Mapping) -> EvaluationDocuments:
        """The documents behind ``inputs`` (``bootstrap_inputs`` of an evaluation)."""
        return cls(_strata([((split, task), document) for document, split, task, _, _ in inputs["rows"]]),
                   len(inputs["member_losses"]), len(inputs["nonmember_losses"]),
                   _strata([(("general", ""), document) for document, _ in inputs["utility"]]))

    def whole(self) -> DocumentDraw:
        """Every document once: the draw that gives the official score."""
        return DocumentDraw(self.rows, range(self.members), range(self.nonmembers), self.utility)

    def resample(self, rng: random.Random) -> DocumentDraw:
        """Every stratum redrawn with replacement, to its own size."""
        return DocumentDraw(_resample(self.rows, rng), rng.choices(range(self.members), k=self.members),
                            rng.choices(range(self.nonmembers), k=self.nonmembers), _resample(self.utility, rng))


def final_of(inputs: Mapping, draw: DocumentDraw) -> float:
    """The final score of one evaluation (``bootstrap_inputs``) on the documents of ``draw``, computed as
    ``scoring`` computes it."""
    by_document: dict[str, list[tuple[str, float]]] = {}
    for document, _, _, kind, score in inputs["rows"]:
        by_document.setdefault(document, []).append((kind, score))
    terms = []
    # The official order: forget before retain, tasks by name, regurgitation before knowledge.
    for split, task in sorted(draw.rows, key=lambda stratum: (stratum[0] != "forget", stratum[1])):
        values: dict[str, list[float]] = {REGURGITATION: [], KNOWLEDGE: []}
        for document in draw.rows[split, task]:
            for kind, score in by_document[document]:
                values[METRIC_OF_KIND[kind]].append(score)
        for metric in (REGURGITATION, KNOWLEDGE):
            if values[metric]:
                mean = statistics.fmean(values[metric])
                terms.append(1 - mean if split == "forget" else mean)
    auc = pairwise_auc([-inputs["member_losses"][i] for i in draw.members],
                       [-inputs["nonmember_losses"][i] for i in draw.nonmembers])
    correct: dict[str, list[int]] = {}
    for document, hit in inputs["utility"]:
        correct.setdefault(document, []).append(hit)
    hits = [hit for documents in draw.utility.values() for document in documents for hit in correct[document]]
    return statistics.fmean([task_aggregate(terms), mia_score(auc), statistics.fmean(hits)])


def pairwise_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """``scoring.roc_auc`` as the Mann-Whitney statistic: the share of (member, nonmember) pairs that the
    score orders right, a tie counting half, which is the area under the ROC curve's trapezoids. A
    bench's statistics recompute tens of thousands of finals; this is some 50 times faster there."""
    wins = sum((member > nonmember) + 0.5 * (member == nonmember)
               for member in member_scores for nonmember in nonmember_scores)
    return wins / (len(member_scores) * len(nonmember_scores))


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap replicates ``values``."""
    ordered = sorted(values)
    count = len(ordered)
    return ordered[int((1 - level) / 2 * count)], ordered[min(count - 1, int((1 + level) / 2 * count))]


def final_interval(runs: Sequence[Mapping], level: float = 0.95, replicates: int = REPLICATES,
                   seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean final score of ``runs`` (``bootstrap_inputs``
    of evaluations on the same sets)."""
    documents = EvaluationDocuments.of(runs[0])
    rng = random.Random(seed)
    finals = []
    for _ in range(replicates):
        draw = documents.resample(rng)
        finals.append(statistics.fmean(final_of(run, draw) for run in runs))
    return percentile_interval(finals, level)
