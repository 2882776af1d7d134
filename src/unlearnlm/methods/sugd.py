"""SUGD, the SemEval-2025 Task 4 winner: gradient difference run over the chunk schedule.

Premptis et al., "AILS-NTUA at SemEval-2025 Task 4" (arXiv 2503.02443). The loss is gradient
difference; what makes it SUGD is the data schedule (disjoint forget chunks, each merged with
cyclically drawn retain rows at 1:ratio, unlearned in sequence) and its settings.
"""

from dataclasses import dataclass
from typing import Optional

from unlearnlm.methods.base import Method
from unlearnlm.methods.gd import gradient_difference_loss
from unlearnlm.methods.registry import register
from unlearnlm.settings import bounded


@dataclass
class SugdSettings:
    retain_weight: float = 0.5
    # See gradient_difference_loss: the level a forget row's loss is pushed up to, not beyond.
    forget_ceiling: Optional[float] = bounded(None, above=0)
    forget_target: Optional[float] = bounded(None, above=0)


register(Method(
    name="sugd", loss=gradient_difference_loss, settings=SugdSettings,
    summary="sequential unlearning with gradient difference over forget chunks (the SemEval winner)",
    config_defaults={"schedule": {"chunk_size": 32, "ratio": 7, "epochs_per_chunk": 7}},
))
