"""Following a run in TensorBoard or Weights & Biases, through accelerate's trackers.

Every row ``unlearn_log.jsonl`` gets is logged too, at its optimizer step: training rows as
``train/<name>``, validation rows as ``validation/<name>``; the resolved configuration is the run's
hyperparameters. TensorBoard writes under ``<out>/tensorboard/<project>``.

After ``--resume`` the JSONL log is cut back to the last checkpoint but a tracker's history is not:
the steps between that checkpoint and the kill appear twice there, the second time as rerun.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from accelerate.utils import gather_object

from unlearnlm.config import TrackingSettings
from unlearnlm.errors import UserError
from unlearnlm.methods.base import Batch
from unlearnlm.paths import partial_dir_for

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
LOG_DIR = "tensorboard"
# Position and bookkeeping fields of a log row, not quantities to plot.
NOT_SCALARS = {"step", "chunk", "epoch", "event", "phase"}


def check_tracker(settings: TrackingSettings) -> None:
    """Refuse a tracker whose package is missing before any model loads."""
    package = TRACKER_PACKAGES.get(settings.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"setting 'tracking.report_to'={settings.report_to!r} needs the {package} package "
                        f"(pip install {package})")


def accelerator_options(settings: TrackingSettings, out_dir: Path) -> dict:
    """``Accelerator`` arguments: the tracker, and its log directory inside the run's temporary
    directory (renamed to ``out_dir`` with the rest of the run)."""
    if settings.report_to == "none":
        return {}
    return {"log_with": settings.report_to, "project_dir": partial_dir_for(out_dir.resolve()) / LOG_DIR}


def finish_trackers(accelerator) -> None:
    """Close the trackers' files before the run's directory is renamed. Not ``end_training``: that
    also destroys the process group, which the processes still need to save the model together."""
    for tracker in accelerator.trackers:
        tracker.finish()


def hyperparameters(config: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The configuration flattened to ``a.b`` keys with scalar values, as trackers store them."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(hyperparameters(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def scalars(row: Mapping) -> dict[str, float]:
    """A log row's numbers under the tracker's names."""
    group = "validation" if row.get("event") == "validation" else "train"
    return {f"{group}/{name}": float(value) for name, value in row.items()
            if name not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


# --- the training log's values, as every process sees them ------------------------------------------


def stat_rows(name: str, batch: Batch) -> int:
    """How many of the batch's rows a logged value averages over (role_means: forget_*, retain_*)."""
    if batch["share"] == 0:
        return 0
    forget_rows = int(batch["is_forget"].sum())
    if name.startswith("forget"):
        return forget_rows
    if name.startswith("retain"):
        return len(batch["keys"]) - forget_rows
    return len(batch["keys"])


def global_means(sums: dict[str, list[float]]) -> dict[str, float]:
    """Row-weighted means over every process's rows: the global batch's values, the same on all ranks,
    so that the log shows them and the divergence guard decides the same everywhere."""
    merged: dict[str, list[float]] = {}
    for local in gather_object([sums]):
        for name, (total, weight) in local.items():
            entry = merged.setdefault(name, [0.0, 0.0])
            entry[0] += total
            entry[1] += weight
    return {name: round(total / weight, 6) for name, (total, weight) in merged.items()}


def brief(stats: dict) -> str:
    """The progress bar's text: each role's loss."""
    return " ".join(f"{name.replace('_loss', '')}={value:.3f}" for name, value in stats.items()
                    if name.endswith("loss") and name != "loss")
