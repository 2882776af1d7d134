"""Scores over several reported draws: means, intervals, paired differences and tie groups.

A draw is one target with its own documents and fine-tuning order; every method runs on every draw.
A score then varies with the draw (which documents, which training order, which last bits) and,
within a draw, with the documents scored. The two-stage (hierarchical) bootstrap (Davison and
Hinkley, "Bootstrap Methods and their Application", 1997, section 3.8) resamples both: a replicate
draws the draws with replacement, then, for each draw it drew, that draw's documents
(``bootstrap.EvaluationDocuments.resample``; a draw drawn twice gets two independent document
draws), and a method's replicate is the mean of its score over the replicate's draws.

Paired: one replicate's draws and documents serve every method, so a difference between two methods
is computed replicate by replicate, and what both share (a hard draw, an easy document) cancels.

Tie groups, exactly: methods are ordered by mean score (then by name). The first is the leader of
group 1, which holds it and every method whose paired interval against it (the method's score minus
the leader's) contains 0. The best method not yet grouped leads group 2, which holds the ungrouped
methods whose paired interval against that leader contains 0; and so on until every method has a
group. Ties are not transitive (A tied with B, B with C, A ahead of C), so a method may be tied with
a member of the group before its own without being in it: the groups rank against their leaders.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from unlearnlm.evaluation.bootstrap import REPLICATES, EvaluationDocuments, final_of, percentile_interval

Resample = TypeVar("Resample")
LEVEL = 0.95


def two_stage_replicates(samplers: Sequence[Callable[[random.Random], Resample]],
                         values: Mapping[str, Sequence[Callable[[Resample], float]]],
                         replicates: int = REPLICATES, seed: int = 0) -> dict[str, list[float]]:
    """Per name, ``replicates`` means over resampled draws: each replicate draws ``len(samplers)`` draws
    with replacement, then ``samplers[d](rng)`` resamples draw ``d``'s documents (once per time it was
    drawn), and ``values[name][d](resample)`` is that name's score on them. Every name sees the same
    resamples (paired)."""
    count = len(samplers)
    rng = random.Random(seed)
    out: dict[str, list[float]] = {name: [] for name in values}
    for _ in range(replicates):
        drawn = [(draw, samplers[draw](rng)) for draw in rng.choices(range(count), k=count)]
        for name, by_draw in values.items():
            out[name].append(statistics.fmean(by_draw[draw](resample) for draw, resample in drawn))
    return out


def final_replicates(runs: Mapping[str, Sequence[Sequence[Mapping]]], replicates: int = REPLICATES,
                     seed: int = 0) -> dict[str, list[float]]:
    """The hierarchical bootstrap of final scores: ``runs[name][d]`` holds the ``bootstrap_inputs`` of
    that name's runs (seeds) on draw ``d``, every name on the same draws; its value on a draw is their
    mean final."""
    names = list(runs)
    draws = len(runs[names[0]])
    documents = [EvaluationDocuments.of(runs[names[0]][draw][0]) for draw in range(draws)]

    def value(inputs: Sequence[Mapping]) -> Callable:
        return lambda resample: statistics.fmean(final_of(one, resample) for one in inputs)

    return two_stage_replicates([documents[draw].resample for draw in range(draws)],
                                {name: [value(runs[name][draw]) for draw in range(draws)] for name in names},
                                replicates, seed)


def fixed_replicates(values: Mapping[str, Sequence[float]], replicates: int = REPLICATES,
                     seed: int = 0) -> dict[str, list[float]]:
    """The bootstrap over draws alone, for scores whose per-document parts were not kept: each
    draw's value is held as measured."""
    draws = len(next(iter(values.values())))
    return two_stage_replicates([lambda rng: None] * draws,
                                {name: [lambda _, v=v: v for v in by_draw] for name, by_draw in values.items()},
                                replicates, seed)


def paired(replicates: Mapping[str, Sequence[float]], means: Mapping[str, float], name: str, against: str,
           level: float = LEVEL) -> dict:
    """``name``'s mean score minus ``against``'s, with the percentile interval of the replicate-wise
    difference."""
    differences = [a - b for a, b in zip(replicates[name], replicates[against], strict=True)]
    low, high = percentile_interval(differences, level)
    return {"against": against, "difference": means[name] - means[against], "interval": [low, high]}


def tie_groups(replicates: Mapping[str, Sequence[float]], means: Mapping[str, float], names: Sequence[str],
               level: float = LEVEL) -> list[list[str]]:
    """``names`` in tie groups, best first (the module docstring gives the rule)."""
    left = sorted(names, key=lambda name: (-means[name], name))
    groups = []
    while left:
        leader = left[0]
        tied = [name for name in left[1:] if _contains_zero(paired(replicates, means, name, leader, level)["interval"])]
        groups.append([leader, *tied])
        left = [name for name in left[1:] if name not in tied]
    return groups


def _contains_zero(interval: Sequence[float]) -> bool:
    return interval[0] <= 0 <= interval[1]


def compare(finals_by_draw: Mapping[str, Sequence[float]], replicates: Mapping[str, Sequence[float]],
            ranked: Sequence[str], reference: str | None = None, oracle: str | None = None,
            level: float = LEVEL) -> dict:
    """Per name: its finals by draw, their mean and spread (sample standard deviation over draws), the
    ``level`` interval of the mean, and its paired differences against the best of ``ranked`` and
    against ``reference``; the tie groups of ``ranked``; with ``oracle``, each mean as a share of the
    oracle's, with its interval from the same replicates."""
    means = {name: statistics.fmean(values) for name, values in finals_by_draw.items()}
    groups = tie_groups(replicates, means, ranked, level)
    best = groups[0][0] if groups else None
    rows = {}
    for name, values in finals_by_draw.items():
        row = {"finals_by_draw": list(values), "mean": means[name],
               "interval": list(percentile_interval(replicates[name], level)),
               "spread": statistics.stdev(values) if len(values) > 1 else None, "range": [min(values), max(values)],
               "paired": {role: paired(replicates, means, name, other, level)
                          for role, other in (("best", best), (reference, reference)) if other and other != name}}
        row["tie_group"] = next((rank for rank, group in enumerate(groups, 1) if name in group), None)
        if oracle is not None and means[oracle]:
            shares = [a / b for a, b in zip(replicates[name], replicates[oracle], strict=True) if b]
            row["of_oracle"] = {"share": means[name] / means[oracle], "interval": list(percentile_interval(shares, level))}
        rows[name] = row
    return {"level": level, "replicates": len(next(iter(replicates.values()))), "best": best, "reference": reference,
            "groups": groups, "by_name": rows}
