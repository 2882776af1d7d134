"""AGAD, the SemEval winners' second method: alternating gradient ascent and descent.

Each forget chunk gets a forgetting phase of pure gradient ascent; every ``anneal_every`` chunks an
annealing phase fine-tunes on a random ``anneal_fraction`` of the retain set; optionally a final
annealing pass covers the whole retain set (Premptis et al., arXiv 2503.02443).
"""

import random
from dataclasses import dataclass

from unlearnlm.data.schedule import RETAIN, Item, Phase, chunk_schedule
from unlearnlm.methods import register
from unlearnlm.methods.base import Method
from unlearnlm.methods.gd import gradient_difference_loss


@dataclass
class Settings:
    anneal_every: int = 1
    anneal_fraction: float = 0.25
    anneal_epochs: int = 1
    final_anneal: bool = False
    # The loss is gradient difference; in AGAD each phase holds one role, so this only scales descent.
    retain_weight: float = 1.0


def agad_schedule(n_forget: int, n_retain: int, config, settings: Settings, seed: int) -> list[Phase]:
    rng = random.Random(seed)
    ascent = chunk_schedule(n_forget, 0, config.schedule.chunk_size, 0, config.schedule.epochs_per_chunk)
    phases: list[Phase] = []
    anneal_size = max(1, round(settings.anneal_fraction * n_retain)) if n_retain else 0
    for number, phase in enumerate(ascent, start=1):
        phases.append(phase)
        if anneal_size and settings.anneal_every and number % settings.anneal_every == 0:
            rows = sorted(rng.sample(range(n_retain), anneal_size))
            phases.append(Phase(f"anneal after chunk {number}", phase.chunk, [Item(RETAIN, i) for i in rows], settings.anneal_epochs, {"anneal": True}))
    if settings.final_anneal and n_retain:
        last_chunk = phases[-1].chunk if phases else 0
        phases.append(Phase("final anneal", last_chunk, [Item(RETAIN, i) for i in range(n_retain)], settings.anneal_epochs, {"anneal": True}))
    return phases


register(Method(
    name="agad", loss=gradient_difference_loss, settings=Settings,
    summary="alternating gradient ascent on forget chunks and descent on retain samples",
    config_defaults={"schedule": {"chunk_size": 32, "ratio": 0, "epochs_per_chunk": 3}},
    schedule=agad_schedule,
))
