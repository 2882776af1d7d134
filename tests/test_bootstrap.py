"""The bootstrap over documents: a replicate that draws every document once is the official score."""

from __future__ import annotations

import random

import pytest

from unlearnlm.evaluation.bootstrap import EvaluationDocuments, bootstrap_inputs, final_interval, final_of, pairwise_auc
from unlearnlm.evaluation.scoring import official_results, roc_auc


def fake_results(seed: int) -> dict:
    """Scored rows of 3 documents per (split, task), 6 MIA documents a side, 8 utility questions."""
    rng = random.Random(seed)
    rows = []
    for split in ("forget", "retain"):
        for task in ("Task1", "Task2", "Task3"):
            for document in range(3):
                for kind, slot in (("sc", "sc1"), ("qa", "qa0"), ("qa", "qa1")):
                    score = rng.random() if kind == "sc" else float(rng.random() < 0.6)
                    rows.append({"id": f"{split}{task}d{document}{slot}", "split": split, "task": task, "kind": kind,
                                 "output": "", "generation": "", "score": score})
    members = [rng.uniform(0.5, 3.0) for _ in range(6)]
    nonmembers = [rng.uniform(1.0, 4.0) for _ in range(6)]
    predictions = [{"id": f"g{question // 2}qa{question % 2}", "answer": 0, "predicted": rng.choice([0, 0, 1])}
                   for question in range(8)]
    utility = sum(item["predicted"] == item["answer"] for item in predictions) / len(predictions)
    results = official_results(rows, members, nonmembers, utility=utility)
    results.update(generations=rows, mia={"member_losses": members, "nonmember_losses": nonmembers},
                   utility_details={"predictions": predictions})
    return results


def test_drawing_every_document_once_gives_the_official_final() -> None:
    results = fake_results(0)
    inputs = bootstrap_inputs(results)
    final = final_of(inputs, EvaluationDocuments.of(inputs).whole())
    assert final == pytest.approx(results["aggregate-score"], abs=1e-12)


def test_interval_brackets_the_estimate_and_narrows_with_agreeing_runs() -> None:
    results = fake_results(1)
    low, high = final_interval([bootstrap_inputs(results)], replicates=300)
    assert low <= results["aggregate-score"] <= high and high - low > 0.01
    # The same run twice is the same mean: the interval cannot change.
    assert final_interval([bootstrap_inputs(results)] * 2, replicates=300) == (low, high)


def test_constant_scores_have_a_zero_width_interval() -> None:
    results = fake_results(2)
    for row in results["generations"]:
        row["score"] = 0.0 if row["split"] == "forget" else 1.0
    results["mia"] = {"member_losses": [1.0] * 6, "nonmember_losses": [1.0] * 6}
    for item in results["utility_details"]["predictions"]:
        item["predicted"] = item["answer"]
    low, high = final_interval([bootstrap_inputs(results)], replicates=200)
    # task aggregate 1, AUC 0.5 (all ties) so MIA score 1, utility 1.
    assert low == high == pytest.approx(1.0)


def test_pairwise_auc_is_the_roc_auc() -> None:
    rng = random.Random(3)
    for members, nonmembers in ((5, 7), (1, 1), (12, 12)):
        # Rounded to one decimal, so that ties within and across the two sides are common.
        member_scores = [round(rng.uniform(0, 2), 1) for _ in range(members)]
        nonmember_scores = [round(rng.uniform(0.5, 2.5), 1) for _ in range(nonmembers)]
        assert pairwise_auc(member_scores, nonmember_scores) == pytest.approx(roc_auc(member_scores, nonmember_scores),
                                                                              abs=1e-12)
