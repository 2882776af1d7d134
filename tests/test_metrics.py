"""The metric table (evaluation/metrics.py) drives selection, the config check and the reports."""

import pytest

from unlearnlm.config import load_config
from unlearnlm.errors import UserError
from unlearnlm.evaluation.metrics import METRICS, SELECTABLE, Metric
from unlearnlm.evaluation.report import HEADLINE_COLUMNS


def test_selection_follows_each_metrics_direction():
    lower = Metric("loss", "loss", (), False, lambda results: results["loss"])
    assert lower.better(0.2, 0.3) and not lower.better(0.3, 0.2)
    assert METRICS["final"].better(0.6, 0.5) and not METRICS["final"].better(0.5, 0.6)


def test_selectable_metrics_are_those_validation_can_score():
    # The choices validation.metric had before the table; MIA AUC has no better direction (best at
    # 0.5) and MMLU needs a set validation does not read.
    assert {"final", "task_aggregate", "mia_score", "utility"} <= set(SELECTABLE)
    assert not {"mia_auc", "mmlu"} & set(SELECTABLE)
    with pytest.raises(UserError, match="'validation.metric': 'mmlu' is not one of final, task_aggregate"):
        load_config(None, ["validation.metric=mmlu"])


def test_report_columns_are_the_table():
    assert HEADLINE_COLUMNS == tuple((name, metric.label) for name, metric in METRICS.items())
    # The columns the reports had before the table, in their order.
    labels = [label for _, label in HEADLINE_COLUMNS]
    assert [label for label in labels if label in ("final", "task aggregate", "MIA score", "MIA AUC", "utility", "MMLU")] == \
        ["final", "task aggregate", "MIA score", "MIA AUC", "utility", "MMLU"]
