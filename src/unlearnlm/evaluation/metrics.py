"""The headline metrics, in one table: each one's name, its label in reports, the sets it needs
besides forget and retain, which way is better, and how it is read from an official results dict
(``evaluation.scoring.official_results``).

The evaluator's headline scores, the reports' columns, the config's check of ``validation.metric``
and checkpoint selection all read this table. Adding a metric: compute its value into the results
dict (a new module beside ``scoring.py``), then add a row here (docs/extending.md).

No torch and no models here: the config checks ``validation.metric`` against this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

# The value the official script leaves in ``aggregate-score`` when MIA or MMLU is missing.
MISSING_AGGREGATE = -1
# The sets checkpoint selection can score (``validation.*``), besides forget and retain.
VALIDATION_SETS = ("members", "nonmembers", "general")


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    needs: tuple[str, ...]  # sets besides forget and retain: members, nonmembers, general, mmlu
    # None: no direction is better (an MIA AUC is best at 0.5; its score is mia_score).
    higher_is_better: bool | None
    value: Callable[[Mapping], float | None]

    @property
    def selectable(self) -> bool:
        """Whether checkpoint selection can use it: it has a direction and validation has its sets."""
        return self.higher_is_better is not None and set(self.needs) <= set(VALIDATION_SETS)

    def better(self, new: float, old: float) -> bool:
        return new > old if self.higher_is_better else new < old


def _final(results: Mapping) -> float | None:
    aggregate = results.get("aggregate-score")
    return None if aggregate in (None, MISSING_AGGREGATE) else aggregate


METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("final", "final", ("members", "nonmembers", "general"), True, _final),
    Metric("task_aggregate", "task aggregate", (), True, lambda results: results["harmonic-mean-task-aggregate"]),
    Metric("mia_score", "MIA score", ("members", "nonmembers"), True, lambda results: results.get("mia_final_score")),
    Metric("mia_auc", "MIA AUC", ("members", "nonmembers"), None, lambda results: results.get("mia_loss_acc")),
    Metric("utility", "utility", ("general",), True, lambda results: results.get("utility")),
    Metric("mmlu", "MMLU", ("mmlu",), True, lambda results: results.get("mmlu_average")),
)}
SELECTABLE = tuple(name for name, metric in METRICS.items() if metric.selectable)


@dataclass(frozen=True)
class Selection:
    """How validation scores choose the state kept (``better(new, old)``) and end the run (``done``).

    The default reads ``validation.metric``; ``--config auto`` brings its own (auto/check.py). Both
    are called on every process with the main process's scores, so every process decides alike.
    """

    better: Callable[[dict, dict], bool]
    done: Callable[[dict], bool] = lambda scores: False
    stop_reason: str = "the validation's stopping rule was met"


def metric_selection(metric: str) -> Selection:
    return Selection(better=lambda new, old: METRICS[metric].better(new[metric], old[metric]))
