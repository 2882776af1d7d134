"""The official SemEval-2025 Task 4 scores, checked against values computed by hand."""

from __future__ import annotations

import math

import pytest

from unlearnlm.evaluation.scoring import (
    MISSING_AGGREGATE,
    aggregated_terms,
    exact_match,
    headline,
    mia_loss_auc,
    mia_score,
    official_results,
    roc_auc,
    rouge_l_recall,
    row_score,
    score_rows,
    split_summary,
    task_aggregate,
)

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel".split()


def test_rouge_l_recall_by_hand():
    # Reference tokens: the cat sat on the mat (6); longest common subsequence: the cat on mat (4).
    assert rouge_l_recall("The cat sat on the mat", "the cat is on mat") == pytest.approx(4 / 6)
    # Porter stemming makes running/run and dogs/dog match.
    assert rouge_l_recall("running dogs", "run dog") == 1.0
    # Recall is over the reference (output), not over the generation.
    assert rouge_l_recall("alpha bravo charlie delta", "alpha bravo") == 0.5
    assert rouge_l_recall("alpha bravo", "alpha bravo charlie delta") == 1.0
    assert rouge_l_recall("alpha bravo", "") == 0.0


def test_exact_match_ignores_case_and_outer_whitespace_only():
    assert exact_match("The city of Deadesius.", "  the CITY of deadesius.\n") == 1
    assert exact_match("1976-03-29", "1976-03-29 and more") == 0
    assert exact_match("The city", "The  city") == 0


def test_row_score_by_kind():
    assert row_score("sc", "alpha bravo charlie delta", "alpha") == 0.25
    assert row_score("qa", "Yes", " yes ") == 1.0
    with pytest.raises(ValueError):
        row_score("xx", "a", "a")


def test_task_aggregate_is_harmonic_and_zero_with_a_zero_term():
    assert task_aggregate([0.5, 1.0]) == pytest.approx(2 / 3)
    assert task_aggregate([0.5, 0.0, 1.0]) == 0.0


def test_mia_auc_and_score_from_known_rankings():
    # Members have the lowest losses: the attack separates them perfectly (AUC 1, score 0).
    assert mia_loss_auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert mia_score(1.0) == 0.0
    # Over-unlearned: members have the highest losses (AUC 0, score 0 as well).
    assert mia_loss_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    # Pairs (member beats nonmember): 1<2, 1<4, 3<4 but not 3<2 -> AUC 3/4, score 1/2.
    assert mia_loss_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    assert mia_score(0.75) == pytest.approx(0.5)
    assert mia_score(0.5) == 1.0
    with pytest.raises(ValueError):
        roc_auc([math.nan], [1.0])


def sc(split: str, task: str, matched: int, number: int = 1) -> dict:
    """A sentence completion whose generation recalls ``matched`` of the 8 reference words."""
    return {"id": f"{task}-{split}-{number}sc1", "task": task, "split": split,
            "output": " ".join(WORDS), "generation": " ".join(WORDS[:matched])}


def qa(split: str, task: str, hits: int, total: int) -> list[dict]:
    return [{"id": f"{task}-{split}-{index}qa0", "task": task, "split": split, "output": "Answer",
             "generation": "answer" if index < hits else "wrong"} for index in range(total)]


def full_rows() -> list[dict]:
    # Distinct means per (split, task, kind); Task3 rows come first to check that tasks are sorted.
    plan = {("forget", "Task3"): (7, 0, 4), ("forget", "Task1"): (1, 3, 4), ("forget", "Task2"): (3, 2, 4),
            ("retain", "Task3"): (4, 1, 4), ("retain", "Task1"): (8, 1, 2), ("retain", "Task2"): (6, 4, 4)}
    rows = []
    for (split, task), (matched, hits, total) in plan.items():
        rows += [sc(split, task, matched), *qa(split, task, hits, total)]
    return rows


def test_twelve_terms_in_the_official_order():
    results = official_results(score_rows(full_rows()))
    expected = [1 - 1 / 8, 1 - 3 / 4, 1 - 3 / 8, 1 - 2 / 4, 1 - 7 / 8, 1 - 0 / 4,
                8 / 8, 1 / 2, 6 / 8, 4 / 4, 4 / 8, 1 / 4]
    assert results["aggregated-terms"] == pytest.approx(expected)
    assert list(results["forget-set"]) == ["overall-regurgitation-score", "overall-knowledge-score", "Task1", "Task2", "Task3"]
    # The per-task blocks keep the raw (not inverted) means.
    assert results["forget-set"]["Task3"] == {"regurgitation-score": 7 / 8, "knowledge-score": 0.0}
    labels = [term.label for term in aggregated_terms({"forget": results["forget-set"], "retain": results["retain-set"]})]
    assert labels[:3] == ["forget Task1 regurgitation", "forget Task1 knowledge", "forget Task2 regurgitation"]
    assert labels[-1] == "retain Task3 knowledge"


def test_harmonic_mean_of_the_official_terms():
    results = official_results(score_rows(full_rows()))
    terms = results["aggregated-terms"]
    assert results["harmonic-mean-task-aggregate"] == pytest.approx(len(terms) / sum(1 / term for term in terms))


def test_overall_scores_pool_rows_across_tasks():
    rows = score_rows([sc("forget", "Task1", 8, 1), sc("forget", "Task1", 8, 2), sc("forget", "Task2", 0, 3)])
    summary = split_summary(rows)
    assert summary["overall-regurgitation-score"] == pytest.approx(2 / 3)  # not the mean of task means (1/2)
    assert summary["overall-knowledge-score"] is None


def test_subset_of_tasks_keeps_only_existing_terms():
    rows = score_rows([sc("forget", "Task2", 2), sc("retain", "Task2", 6), *qa("retain", "Task2", 1, 2)])
    results = official_results(rows)
    assert results["aggregated-terms"] == pytest.approx([1 - 2 / 8, 6 / 8, 1 / 2])
    assert results["forget-set"]["Task2"]["knowledge-score"] is None
    assert "Task1" not in results["retain-set"]
    assert results["aggregate-score"] == MISSING_AGGREGATE
    assert "mia_final_score" not in results


def test_final_score_uses_mmlu_over_utility():
    rows = score_rows([sc("forget", "Task1", 4), sc("retain", "Task1", 8)])
    task = 2 / (1 / 0.5 + 1 / 1.0)
    with_utility = official_results(rows, [1.0, 3.0], [2.0, 4.0], utility=0.9)
    assert with_utility["mia_loss_acc"] == pytest.approx(0.75)
    assert with_utility["mia_final_score"] == pytest.approx(0.5)
    assert with_utility["aggregate-score"] == pytest.approx((task + 0.5 + 0.9) / 3)
    both = official_results(rows, [1.0, 3.0], [2.0, 4.0], mmlu_average=0.3, utility=0.9)
    assert both["aggregate-score"] == pytest.approx((task + 0.5 + 0.3) / 3)
    assert both["utility"] == 0.9 and both["mmlu_average"] == 0.3
    assert headline(both)["final"] == both["aggregate-score"]
    assert headline(official_results(rows, utility=0.9))["final"] is None


def test_official_key_set():
    results = official_results(score_rows(full_rows()), [1.0], [2.0], mmlu_average=0.5)
    assert set(results) == {"forget-set", "retain-set", "mia_loss_acc", "mmlu_average", "aggregated-terms",
                            "harmonic-mean-task-aggregate", "aggregate-score", "mia_final_score"}
