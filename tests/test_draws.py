"""Scores over several draws: the two-stage bootstrap against distributions enumerated by hand, its
pairing, and the tie groups."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest

from unlearnlm.evaluation.draws import compare, final_replicates, fixed_replicates, tie_groups, two_stage_replicates

REPLICATES = 4000

# Two draws of two documents each, one score per document: draw A scores 0 and 1, draw B 1 and 1.
# A draw's value on a resample of its documents is their mean, so A gives 0, 1/2, 1 with probabilities
# 1/4, 1/2, 1/4 and B always 1. A replicate picks two draws (A or B, 1/2 each) and averages their values:
# one draw's value X is 0, 1/2, 1 with probabilities 1/8, 1/4, 5/8, and the replicate (X1 + X2) / 2
# takes the five values below, enumerated by hand over the 3 x 3 pairs of X values.
DRAWS = [[0.0, 1.0], [1.0, 1.0]]
HAND = {0.0: Fraction(1, 64), 0.25: Fraction(4, 64), 0.5: Fraction(14, 64), 0.75: Fraction(20, 64),
        1.0: Fraction(25, 64)}


def document_means(draws, shift: float = 0.0) -> tuple[list, list]:
    samplers = [lambda rng, docs=docs: rng.choices(docs, k=len(docs)) for docs in draws]
    values = [lambda resample: sum(resample) / len(resample) + shift] * len(draws)
    return samplers, values


def test_two_stage_bootstrap_matches_the_hand_enumeration() -> None:
    samplers, values = document_means(DRAWS)
    replicates = two_stage_replicates(samplers, {"m": values}, REPLICATES)["m"]
    counts = Counter(round(value, 12) for value in replicates)
    assert set(counts) <= set(HAND)
    for value, probability in HAND.items():
        standard_error = math.sqrt(probability * (1 - probability) / REPLICATES)
        assert counts[value] / REPLICATES == pytest.approx(float(probability), abs=5 * standard_error)
    # The 2.5% point: P(0) = 1.6% < 2.5% <= P(<= 0.25) = 7.8%; the 97.5% point: P(< 1) = 61% < 97.5%.
    ordered = sorted(replicates)
    assert (ordered[int(0.025 * REPLICATES)], ordered[int(0.975 * REPLICATES)]) == (0.25, 1.0)


def test_both_stages_count() -> None:
    """The variance of a replicate, by hand: Var(X) / 2 with Var(X) = E[X^2] - E[X]^2 = 11/16 - 9/16 = 1/8,
    so 1/16; draws alone (documents fixed, A at 1/2) give 1/32; one pooled stage over the four documents
    (three of them 1) would give 3/64."""
    samplers, values = document_means(DRAWS)
    two_stage = two_stage_replicates(samplers, {"m": values}, REPLICATES)["m"]
    draws_only = fixed_replicates({"m": [0.5, 1.0]}, REPLICATES)["m"]
    assert set(draws_only) == {0.5, 0.75, 1.0}
    # The sample variance's standard error, sqrt((mu4 - sigma^4) / n) from the hand distributions, is 2.2%
    # (two stages) and 1.6% (draws alone) of the variance: 12% is over 5 of them, and far from 3/64.
    for replicates, variance in ((two_stage, 1 / 16), (draws_only, 1 / 32)):
        assert sample_variance(replicates) == pytest.approx(variance, rel=0.12)
    assert sample_variance(two_stage) > 1.15 * 3 / 64


def sample_variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((value - mean) ** 2 for value in values) / (len(values) - 1)


def test_differences_are_paired() -> None:
    """A method that scores 0.1 above another on every document of every draw differs from it by exactly
    0.1 in every replicate, though either alone has a wide interval."""
    samplers, values = document_means(DRAWS)
    _, shifted = document_means(DRAWS, shift=0.1)
    replicates = two_stage_replicates(samplers, {"a": values, "b": shifted}, 500)
    result = compare({"a": [0.5, 1.0], "b": [0.6, 1.1]}, replicates, ["a", "b"])
    assert result["by_name"]["a"]["paired"]["best"]["against"] == "b"
    assert result["by_name"]["a"]["paired"]["best"]["interval"] == pytest.approx([-0.1, -0.1], abs=1e-12)
    low, high = result["by_name"]["a"]["interval"]
    assert high - low >= 0.5
    assert result["groups"] == [["b"], ["a"]]


def bootstrap_inputs_with_utility(hits: list[int]) -> dict:
    """``bootstrap_inputs`` of an evaluation whose task aggregate and MIA score are 1 on any resample
    (every forget row 0, every retain row 1, members and nonmembers at the same loss: AUC 0.5), so that
    its final is (2 + utility) / 3; one general question per document, answered as ``hits`` says."""
    rows = [[f"{split}{task}", split, task, kind, 0.0 if split == "forget" else 1.0]
            for split in ("forget", "retain") for task in ("Task1", "Task2", "Task3") for kind in ("sc", "qa")]
    return {"rows": rows, "member_losses": [2.0, 2.0], "nonmember_losses": [2.0, 2.0],
            "utility": [[f"g{index}", hit] for index, hit in enumerate(hits)]}


def test_final_scores_resample_draws_then_documents() -> None:
    """The same hand enumeration through the official final: utility plays the document scores above."""
    runs = {"m": [[bootstrap_inputs_with_utility([0, 1])], [bootstrap_inputs_with_utility([1, 1])]]}
    replicates = final_replicates(runs, REPLICATES)["m"]
    counts = Counter(round(3 * value - 2, 9) for value in replicates)
    assert set(counts) <= set(HAND)
    assert counts[0.0] / REPLICATES == pytest.approx(1 / 64, abs=0.01)
    assert counts[1.0] / REPLICATES == pytest.approx(25 / 64, abs=0.04)


def test_tie_groups_rank_against_each_leader() -> None:
    """b's interval against a holds 0 (tied); c's against a does not, though c's against b does: c leads
    group 2, since groups are formed against their leaders; d is behind everyone."""
    steps = [-1 + 2 * i / 1000 for i in range(1001)]  # the 2.5% and 97.5% points are -0.95 and 0.95
    replicates = {"a": [0.9] * 1001, "b": [0.85 + 0.1 * e for e in steps], "c": [0.78 - 0.1 * e for e in steps],
                  "d": [0.5] * 1001}
    means = {"a": 0.9, "b": 0.85, "c": 0.78, "d": 0.5}
    # b - a: [-0.145, 0.045]; c - a: [-0.215, -0.025]; c - b: -0.07 - 0.2 e, [-0.26, 0.12]
    assert tie_groups(replicates, means, ["d", "c", "b", "a"]) == [["a", "b"], ["c"], ["d"]]
    result = compare({name: [mean] for name, mean in means.items()}, replicates, ["a", "b", "c"], reference="c",
                     oracle="d")
    assert result["best"] == "a"
    assert [result["by_name"][name]["tie_group"] for name in "abcd"] == [1, 1, 2, None]
    assert result["by_name"]["b"]["paired"]["c"]["interval"] == pytest.approx([-0.12, 0.26])
    assert "c" not in result["by_name"]["c"]["paired"]
    assert result["by_name"]["a"]["of_oracle"]["share"] == pytest.approx(0.9 / 0.5)


def test_equal_means_are_ordered_by_name() -> None:
    replicates = {"x": [0.5, 0.6], "y": [0.5, 0.6]}
    assert tie_groups(replicates, {"x": 0.55, "y": 0.55}, ["y", "x"]) == [["x", "y"]]


def test_bench_statistics_cover_every_method_and_the_oracle(tmp_path) -> None:
    from unlearnlm.bench.report import plot_draws, ranking_table
    from unlearnlm.bench.statistics import draw_statistics

    hits = {"sugd": [[1, 1], [1, 1]], "gd": [[0, 1], [0, 0]], "oracle": [[1, 1], [0, 1]]}

    def scores(method: str, draw: int) -> dict:
        inputs = bootstrap_inputs_with_utility(hits[method][draw])
        return {"final": (2 + sum(hits[method][draw]) / 2) / 3, "bootstrap": inputs}

    reported = [{"method": method, "draw": draw, "seed": 0, "scores": scores(method, draw)}
                for method in ("gd", "sugd") for draw in (0, 1)]
    audits = [{name: {"worst_case": {"final": 0.5 + 0.1 * draw + (name == "sugd") * 0.2}} for name in hits}
              for draw in (0, 1)]
    result = draw_statistics(reported, [scores("oracle", 0), scores("oracle", 1)], audits, replicates=300)
    final = result["final"]
    assert final["best"] == "sugd" and final["groups"] == [["sugd"], ["gd"]]
    assert final["by_name"]["gd"]["finals_by_draw"] == pytest.approx([2.5 / 3, 2 / 3])
    assert final["by_name"]["oracle"]["finals_by_draw"] == pytest.approx([1.0, 2.5 / 3])
    assert set(final["by_name"]["oracle"]["paired"]) == {"best", "sugd"}
    # gd scores below sugd on every document resample of every draw: the whole interval is below 0.
    assert final["by_name"]["gd"]["paired"]["sugd"]["interval"][1] < 0
    robust = result["robust_final"]
    assert robust["draws"] == 2 and robust["best"] == "sugd"
    assert robust["by_name"]["gd"]["paired"]["sugd"]["interval"] == pytest.approx([-0.2, -0.2])
    one = draw_statistics(reported, [scores("oracle", 0), scores("oracle", 1)], audits[:1], replicates=50)
    assert one["robust_final"]["draws"] == 1 and "interval" not in one["robust_final"]["by_name"]["gd"]
    table = ranking_table(final)
    assert "| 1 | sugd |" in table and "| 2 | gd |" in table and "(sugd)" in table
    assert "| - | sugd |" in ranking_table(one["robust_final"])
    assert plot_draws(final, tmp_path / "draws.png", "finals").stat().st_size > 0
