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

from unlearnlm.evaluation.scoring import KNOWLEDGE, METRIC_OF_KIND, REGURGITATION, mia_score, roc_auc, task_aggregate

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


def _final(inputs: Mapping, rows_draw: Mapping, members: Sequence[int], nonmembers: Sequence[int],
           utility_draw: Mapping) -> float:
    by_document: dict[str, list[tuple[str, float]]] = {}
    for document, _, _, kind, score in inputs["rows"]:
        by_document.setdefault(document, []).append((kind, score))
    terms = []
    # The official order: forget before retain, tasks by name, regurgitation before knowledge.
    for split, task in sorted(rows_draw, key=lambda stratum: (stratum[0] != "forget", stratum[1])):
        values: dict[str, list[float]] = {REGURGITATION: [], KNOWLEDGE: []}
        for document in rows_draw[split, task]:
            for kind, score in by_document[document]:
                values[METRIC_OF_KIND[kind]].append(score)
        for metric in (REGURGITATION, KNOWLEDGE):
            if values[metric]:
                mean = statistics.fmean(values[metric])
                terms.append(1 - mean if split == "forget" else mean)
    auc = roc_auc([-inputs["member_losses"][i] for i in members], [-inputs["nonmember_losses"][i] for i in nonmembers])
    correct: dict[str, list[int]] = {}
    for document, hit in inputs["utility"]:
        correct.setdefault(document, []).append(hit)
    hits = [hit for documents in utility_draw.values() for document in documents for hit in correct[document]]
    return statistics.fmean([task_aggregate(terms), mia_score(auc), statistics.fmean(hits)])


def final_interval(runs: Sequence[Mapping], level: float = 0.95, replicates: int = REPLICATES,
                   seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean final score of ``runs`` (``bootstrap_inputs``
    of evaluations on the same sets)."""
    first = runs[0]
    rows_strata = _strata([((split, task), document) for document, split, task, _, _ in first["rows"]])
    utility_strata = _strata([("general", document) for document, _ in first["utility"]])
    n_members, n_nonmembers = len(first["member_losses"]), len(first["nonmember_losses"])
    rng = random.Random(seed)
    finals = []
    for _ in range(replicates):
        rows_draw = _resample(rows_strata, rng)
        members = rng.choices(range(n_members), k=n_members)
        nonmembers = rng.choices(range(n_nonmembers), k=n_nonmembers)
        utility_draw = _resample(utility_strata, rng)
        finals.append(statistics.fmean(_final(run, rows_draw, members, nonmembers, utility_draw) for run in runs))
    finals.sort()
    return finals[int((1 - level) / 2 * replicates)], finals[min(replicates - 1, int((1 + level) / 2 * replicates))]
