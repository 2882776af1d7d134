"""The official SemEval-2025 Task 4 scores, checked against values computed by hand."""

from __future__ import annotations

import math
import random
from fractions import Fraction

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


def pair_counting_auc(member_scores, nonmember_scores) -> float:
    """AUC as a probability: P(a member's score ranks above a nonmember's), a tie counting 1/2."""
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in member_scores for n in nonmember_scores)
    return wins / (len(member_scores) * len(nonmember_scores))


def harmonic_mean_by_reciprocals(values) -> Fraction:
    """n / sum(1/x), in exact fractions; 0 when a value is 0 (the statistics.harmonic_mean convention)."""
    values = [Fraction(value) for value in values]
    return Fraction(0) if 0 in values else len(values) / sum(1 / value for value in values)


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
    # 2 / (1/0.5 + 1/1) = 2 / (2 + 1) = 2/3 (the arithmetic mean would be 3/4).
    assert task_aggregate([0.5, 1.0]) == pytest.approx(2 / 3)
    # 3 / (1/1 + 1/0.5 + 1/0.25) = 3 / (1 + 2 + 4) = 3/7 (arithmetic mean 7/12, geometric mean 1/2).
    assert task_aggregate([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    # 4 / (4 * 1/0.8) = 0.8: equal terms are their own harmonic mean.
    assert task_aggregate([0.8] * 4) == pytest.approx(0.8)
    assert task_aggregate([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        task_aggregate([])


def test_mia_auc_and_score_from_known_rankings():
    # The attack score is -loss, members labelled 1: a member "wins" a pair when its loss is lower.
    # Members have the lowest losses: all 4 pairs won, AUC 4/4 = 1, score 1 - 2|1 - 0.5| = 0.
    assert mia_loss_auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert mia_score(1.0) == 0.0
    # Over-unlearned: members have the highest losses, 0 of 4 pairs won: AUC 0, score 1 - 2|0 - 0.5| = 0.
    assert mia_loss_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert mia_score(0.0) == 0.0
    # Pairs (member loss < nonmember loss): 1<2, 1<4, 3<4 but not 3<2 -> AUC 3/4, score 1 - 2 * 1/4 = 1/2.
    assert mia_loss_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    assert mia_score(0.75) == pytest.approx(0.5)
    # A tie counts 1/2. Members (1, 2, 3) against nonmembers (2, 4): 1<2 1, 1<4 1, 2=2 1/2, 2<4 1,
    # 3>2 0, 3<4 1 -> 4.5 of 6 pairs = 3/4.
    assert mia_loss_auc([1.0, 2.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    # All losses equal: every pair a tie, AUC 1/2, score 1 (chance).
    assert mia_loss_auc([2.0, 2.0], [2.0, 2.0, 2.0]) == pytest.approx(0.5)
    assert mia_score(0.5) == 1.0
    # Symmetric in the direction of the error: 1 - 2|0.25 - 0.5| = 1 - 2|0.75 - 0.5| = 1/2; 1 - 2 * 0.4 = 0.2.
    assert mia_score(0.25) == pytest.approx(0.5)
    assert mia_score(0.9) == pytest.approx(0.2)
    assert mia_score(0.1) == pytest.approx(0.2)
    # roc_auc itself takes attack scores (higher = member), not losses: 3 of 4 pairs as above.
    assert roc_auc([2.0, 4.0], [1.0, 3.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        roc_auc([math.nan], [1.0])
    with pytest.raises(ValueError):
        roc_auc([], [1.0])


def test_mia_auc_equals_pair_counting_with_ties():
    # Losses on a coarse grid, so that many member/nonmember pairs tie; unequal group sizes.
    rng = random.Random(0)
    members = [rng.randint(0, 8) / 4 for _ in range(23)]
    nonmembers = [rng.randint(2, 10) / 4 for _ in range(31)]
    expected = pair_counting_auc([-loss for loss in members], [-loss for loss in nonmembers])
    assert 0.5 < expected < 1  # informative: neither chance nor perfect separation
    assert mia_loss_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    assert mia_score(mia_loss_auc(members, nonmembers)) == pytest.approx(1 - 2 * abs(expected - 0.5), abs=1e-12)
    # Swapping the groups mirrors the AUC and leaves the score.
    assert mia_loss_auc(nonmembers, members) == pytest.approx(1 - expected, abs=1e-12)


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


# The 12 terms of full_rows() by hand, in the official order (forget Task1 sc, qa, Task2 sc, qa, ...,
# retain ... Task3 qa); each sc mean is matched/8 words recalled, each qa mean hits/total, forget inverted.
FULL_ROWS_TERMS = [Fraction(1) - Fraction(1, 8), Fraction(1) - Fraction(3, 4),
                   Fraction(1) - Fraction(3, 8), Fraction(1) - Fraction(2, 4),
                   Fraction(1) - Fraction(7, 8), Fraction(1) - Fraction(0, 4),
                   Fraction(8, 8), Fraction(1, 2), Fraction(6, 8), Fraction(4, 4), Fraction(4, 8), Fraction(1, 4)]


def test_twelve_terms_in_the_official_order():
    results = official_results(score_rows(full_rows()))
    assert results["aggregated-terms"] == pytest.approx([float(term) for term in FULL_ROWS_TERMS])
    assert list(results["forget-set"]) == ["overall-regurgitation-score", "overall-knowledge-score", "Task1", "Task2", "Task3"]
    # The per-task blocks keep the raw (not inverted) means.
    assert results["forget-set"]["Task3"] == {"regurgitation-score": 7 / 8, "knowledge-score": 0.0}
    labels = [term.label for term in aggregated_terms({"forget": results["forget-set"], "retain": results["retain-set"]})]
    assert labels[:3] == ["forget Task1 regurgitation", "forget Task1 knowledge", "forget Task2 regurgitation"]
    assert labels[-1] == "retain Task3 knowledge"


def test_harmonic_mean_of_the_official_terms():
    results = official_results(score_rows(full_rows()))
    # Terms 7/8, 1/4, 5/8, 1/2, 1/8, 1, 1, 1/2, 3/4, 1, 1/2, 1/4; reciprocals
    # 8/7 + 4 + 8/5 + 2 + 8 + 1 + 1 + 2 + 4/3 + 1 + 2 + 4 = 25 + 428/105 = 3053/105,
    # so the harmonic mean is 12 / (3053/105) = 1260/3053 (about 0.4127; the arithmetic mean is 0.6042).
    assert harmonic_mean_by_reciprocals(FULL_ROWS_TERMS) == Fraction(1260, 3053)
    assert results["harmonic-mean-task-aggregate"] == pytest.approx(1260 / 3053, abs=1e-12)


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
