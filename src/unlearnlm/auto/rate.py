"""The learning-rate probe: the first chunk, trained from the original weights at a few rates.

A rate is tried on the first chunk alone, with its retain rows, its epochs and the run's schedule,
and read by two numbers: the chunk's forget rows' mean answer loss (has the chunk reached the level
of unseen text?) and the retain rows' answer loss (is it within the check's tolerance?). The rate
kept is the one that brings the chunk just to the level: a smaller one leaves the chunk's documents
recognisable when the chunk ends, and a larger one pushes them past it (the ceiling stops the ascent
on a row only while that row is trained, and the ascent on its neighbours goes on raising it) and
damages more. If that rate damages the retain set, the probe steps down until it does not.

One chunk from the original weights does not show all the damage a rate does: on the benchmark's
targets, the rate that brought the first chunk to the level kept the retain loss at 0.02 nats after
it, 0.46 after the second chunk, and wrecked the retain answers by the end, where half of it did not.
So the run itself confirms the rate: its first two chunks, trained and checked as the run trains and
checks them, are kept when the retain loss after them is within its bound; otherwise the weights go
back to the original ones and the run starts again at half the rate (``next_rate``). A schedule of
one chunk has nothing to confirm.

The rates probed are powers of two from 2^-20 (about 1e-6, below the rates 7B models are unlearned
with) to 2^-6 (about 1.6e-2, above the rates that wreck the tiny benchmark targets). Bisection over
those 15 octaves narrows the crossing to two octaves in 3 probes; within them the rate is
interpolated, the loss taken as linear in the logarithm of the rate between the two probes around
the crossing. A fourth probe would halve the bracket, but the confirmation steps by whole octaves
anyway, and each probe costs a chunk's training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

LOWEST_OCTAVE = -20
HIGHEST_OCTAVE = -6
# Steps down from the rate that reaches the level when the retain set is damaged at it.
MAX_STEPS_DOWN = 3
BRACKET_OCTAVES = 2  # the bisection stops at a bracket this wide


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
    """The rate at which the probe's loss crosses ``level``, assuming it grows with the rate: bisection
    over the octaves ``lowest..highest`` down to a bracket of two, interpolated within it; then down by
    octaves while the retain loss is above ``retain_bound``."""
    tried: dict[int, Probe] = {}

    def result(octave: int) -> Probe:
        if octave not in tried:
            tried[octave] = probe(2.0 ** octave)
        return tried[octave]

    below, above = lowest - 1, highest + 1  # known: below does not reach; above stands for "reaches"
    while above - below > BRACKET_OCTAVES:
        middle = (below + above) // 2
        if result(middle).forget_loss >= level:
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
    probes = tuple(tried[octave] for octave in sorted(tried))
    return RateChoice(lr, final.forget_loss >= level, final.retain_loss <= retain_bound, probes)


def next_rate(confirmations: Sequence[float], retain_bound: float, lr: float) -> float | None:
    """After the run's first chunks at ``lr`` left the retain losses ``confirmations`` (this rate's
    last): None to go on at ``lr``, or the rate to start again at (half of it), at most
    ``MAX_STEPS_DOWN`` times."""
    if confirmations[-1] <= retain_bound or len(confirmations) > MAX_STEPS_DOWN:
        return None
    return lr / 2


def crossing(low: Probe, high: Probe, level: float) -> float:
    """The rate between two probes at which the forget loss, linear in log2(rate) between them, is ``level``."""
    span = high.forget_loss - low.forget_loss
    fraction = (level - low.forget_loss) / span if span > 0 else 1.0
    return low.lr * (high.lr / low.lr) ** min(1.0, max(0.0, fraction))
