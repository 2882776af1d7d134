"""The learning-rate probe: the first chunk, trained from the original weights at a few rates.

A rate is tried on the first chunk alone, with its retain rows, its epochs and the run's schedule,
and read by two numbers: the chunk's forget rows' mean answer loss (has the chunk reached the level
of unseen text?) and the retain rows' answer loss (is it within the check's tolerance?). The rate
kept is the one that brings the chunk just to the level: a smaller one leaves the chunk's documents
recognisable when the chunk ends, and a larger one pushes them past it (the ceiling stops the ascent
on a row only while that row is trained, and the ascent on its neighbours goes on raising it) and
damages more. If that rate damages the retain set, the probe steps down until it does not.

One chunk from the original weights does not show all the damage a rate does: on the benchmark's
targets (16 chunks), the rate that brought the first chunk to the level kept the retain loss at
0.02 nats after it, 0.46 after the second chunk, and wrecked the retain answers by the end, where
half of it did not. So the rate kept is then confirmed on the first two chunks in sequence, trained
as the run trains them (each forget row held at the level from both sides, the optimizer reset
between them), and halved while the retain loss after the second breaks its bound. A schedule of
one chunk has nothing to confirm.

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
    retain_ok: bool  # and kept the retain loss within its bound (in the confirmation, when there is one)
    probes: tuple[Probe, ...]
    confirmations: tuple[Probe, ...] = ()  # the first two chunks in sequence, at the rate kept and below


def choose_rate(probe: Callable[[float], Probe], level: float, retain_bound: float,
                lowest: int = LOWEST_OCTAVE, highest: int = HIGHEST_OCTAVE,
                confirm: Callable[[float], Probe] | None = None) -> RateChoice:
    """The smallest rate 2^k (``lowest <= k <= highest``) whose probe reaches ``level``, assuming the
    forget loss grows with the rate; then down while the retain loss is above ``retain_bound``; then,
    with ``confirm`` (the first two chunks at a rate), halved while their retain loss is above it."""
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
    probes = tuple(tried[octave] for octave in sorted(tried))
    if confirm is None:
        return RateChoice(lr, final.forget_loss >= level, final.retain_loss <= retain_bound, probes)
    confirmations = confirmed(confirm, lr, retain_bound)
    last = confirmations[-1]
    return RateChoice(last.lr, final.forget_loss >= level, last.retain_loss <= retain_bound, probes, confirmations)


def confirmed(confirm: Callable[[float], Probe], lr: float, retain_bound: float) -> tuple[Probe, ...]:
    """``confirm`` at ``lr``, then at half the rate while the retain loss is above ``retain_bound``
    (at most ``MAX_STEPS_DOWN`` halvings); the last one is the rate kept."""
    results = [confirm(lr)]
    while results[-1].retain_loss > retain_bound and len(results) <= MAX_STEPS_DOWN:
        results.append(confirm(results[-1].lr / 2))
    return tuple(results)


def crossing(low: Probe, high: Probe, level: float) -> float:
    """The rate between two probes at which the forget loss, linear in log2(rate) between them, is ``level``."""
    span = high.forget_loss - low.forget_loss
    fraction = (level - low.forget_loss) / span if span > 0 else 1.0
    return low.lr * (high.lr / low.lr) ** min(1.0, max(0.0, fraction))
