"""Evaluation: the official SemEval-2025 Task 4 scores, the MIA suite, utility and MMLU.

The main entry points are re-exported lazily, so ``import unlearnlm.evaluation.inputs`` (loading the sets)
does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "EvalData": "evaluator", "EvalSettings": "evaluator", "evaluate_model": "evaluator", "load_model": "evaluator",
    "quick_scores": "evaluator", "official_results": "scoring", "score_rows": "scoring", "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
