"""The learning-rate probe: the first chunk, trained from the original weights at a few rates.

A rate is tried on the first chunk alone, with its retain rows, its epochs and the run's schedule,
and read by two numbers: the chunk's forget rows' mean answer loss (has the chunk reached the level
of unseen text?) and the retain rows' answer loss (is it within the check's tolerance?). The rate
kept is the one that brings the chunk just to the level: a smaller one leaves the chunk's documents
recognisable when the chunk ends, and a larger one pushes them past it (the ceiling stops the ascent
on a row only while that row is trained, and the ascent on its neighbours goes on raising it) and
damages more. If that rate damages the retain set, the probe steps down until it does not.

The rates probed are powers of two from 2^-20 (about 1e-6, below the rates 7B models are unlearned
with) to 2^-6 (about 1.6e-2, above the rates that wreck the tiny benchmark targets). The octave in
which the chunk's loss crosses the level is found by bisection over those 15 octaves, in 4 probes;
within it the rate is interpolated, the loss taken as linear in the logarithm of the rate between
the two probes around the crossing (no fifth probe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

LOWEST_OCTAVE = -20
HIGHEST_OCTAVE = -6
# Steps down from the rate that reaches the level when the retain set is damaged at it.
MAX_STEPS_DOWN = 3


@dataclass(frozen=True)
class Probe:
    lr: float
    forget_loss: float  # the first chunk's forget rows, mean answer loss after the chunk
    retain_loss: float  # the retain rows the check reads, mean answer loss after the chunk
    seconds: float = 0.0


@dataclass(frozen=True)
class RateChoice:
    lr: float
    reached: bool  # the chunk reached the level at this rate
    retain_ok: bool  # and kept the retain loss within its bound
    probes: tuple[Probe, ...]


def choose_rate(probe: Callable[[float], Probe], level: float, retain_bound: float,
                lowest: int = LOWEST_OCTAVE, highest: int = HIGHEST_OCTAVE) -> RateChoice:
    """The smallest rate 2^k (``lowest <= k <= highest``) whose probe reaches ``level``, assuming the
    forget loss grows with the rate; then down while the retain loss is above ``retain_bound``."""
    tried: dict[int, Probe] = {}

    def result(octave: int) -> Probe:
        if octave not in tried:
            tried[octave] = probe(2.0 ** octave)
        return tried[octave]

    def reaches(octave: int) -> bool:
        return result(octave).forget_loss >= level

    below, above = lowest - 1, highest + 1  # known: below does not reach; above stands for "reaches"
    while above - below > 1:
        middle = (below + above) // 2
        if reaches(middle):
            above = middle
        else:
            below = middle
    chosen = min(above, highest)
    for _ in range(MAX_STEPS_DOWN):
        if result(chosen).retain_loss <= retain_bound or chosen == lowest:
            break
        chosen -= 1
    final = result(chosen)
    lr = final.lr
    if chosen == above and below in tried:  # the crossing lies in (2^below, 2^above]
        lr = crossing(tried[below], final, level)
    return RateChoice(lr, final.forget_loss >= level, final.retain_loss <= retain_bound,
                      tuple(tried[octave] for octave in sorted(tried)))


def crossing(low: Probe, high: Probe, level: float) -> float:
    """The rate between two probes at which the forget loss, linear in log2(rate) between them, is ``level``."""
    span = high.forget_loss - low.forget_loss
    fraction = (level - low.forget_loss) / span if span > 0 else 1.0
    return low.lr * (high.lr / low.lr) ** min(1.0, max(0.0, fraction))
