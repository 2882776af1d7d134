"""The bench's verdicts over its reported draws: ``evaluation.draws`` applied to the final and the
robust final of every method and of the oracle (docs/benchmark.md, "Statistics"), and the per-method
summary the report reads."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from unlearnlm.evaluation.bootstrap import REPLICATES
from unlearnlm.evaluation.draws import compare, final_replicates, fixed_replicates

ORACLE = "oracle"
# The authors' recipe, against which every method's paired difference is also given.
REFERENCE = "sugd"


def by_draw(reported: Sequence[Mapping], draws: int) -> dict[str, list[list[Mapping]]]:
    """Per method, per reported draw, its runs (one per seed)."""
    runs: dict[str, list[list[Mapping]]] = {}
    for entry in reported:
        runs.setdefault(entry["method"], [[] for _ in range(draws)])[entry["draw"]].append(entry)
    return runs


def draw_statistics(reported: Sequence[Mapping], oracle_scores: Sequence[Mapping],
                    audits: Sequence[Mapping] = (), replicates: int = REPLICATES) -> dict:
    """``{"final": ..., "robust_final": ...}``, each ``evaluation.draws.compare``'s result over the methods
    and the oracle (the oracle is not ranked). ``reported``: the bench's reported runs, each with its
    ``draw`` (an index into ``oracle_scores``, one per reported draw) and scores with ``bootstrap``
    inputs. ``audits``: per audited draw (the first ones), the audit of every method and the oracle.

    The final's interval resamples draws and documents; the robust final's resamples the audited draws
    alone (the bench keeps no per-document scores of the attacks), so with one audited draw it has none.
    """
    runs = by_draw(reported, len(oracle_scores))
    methods = [name for name, draws in runs.items() if all(draws)]  # a method missing on a draw is not compared
    inputs = {name: [[entry["scores"]["bootstrap"] for entry in runs[name][draw]] for draw in range(len(oracle_scores))]
              for name in methods}
    inputs[ORACLE] = [[scores["bootstrap"]] for scores in oracle_scores]
    finals = {name: [statistics.fmean(entry["scores"]["final"] for entry in draws) for draws in runs[name]]
              for name in methods}
    finals[ORACLE] = [scores["final"] for scores in oracle_scores]
    reference = REFERENCE if REFERENCE in methods else None
    result = {"final": compare(finals, final_replicates(inputs, replicates), methods, reference, ORACLE)}
    audited = [draw for draw in audits if all(name in draw for name in (*methods, ORACLE))]
    robust = {name: [draw[name]["worst_case"]["final"] for draw in audited] for name in (*methods, ORACLE)}
    if len(audited) > 1:
        result["robust_final"] = compare(robust, fixed_replicates(robust, replicates), methods, reference, ORACLE)
    elif audited:  # one draw: the values, and no interval to give them
        result["robust_final"] = {"by_name": {name: {"finals_by_draw": values, "mean": values[0]}
                                              for name, values in robust.items()}}
    if audited:
        result["robust_final"]["draws"] = len(audited)
    return result


def summarize(results: dict) -> list[dict]:
    """Per reported method: its scores' means over every reported run (draws and seeds), its time, memory
    and size, and its final and robust final over the draws (``results["statistics"]``)."""
    summary = []
    verdicts = results["statistics"]
    methods = dict.fromkeys(entry["method"] for entry in results["reported"])
    for method in methods:
        entries = [e for e in results["reported"] if e["method"] == method]
        row = {"method": method, "runs": len(entries)}
        for key in ("task_aggregate", "mia_score", "mia_auc", "utility"):
            values = [e["scores"][key] for e in entries if e["scores"][key] is not None]
            row[key] = statistics.mean(values) if values else None
        for key in ("wall_seconds", "peak_rss_mb", "trainable_parameters"):
            values = [e[key] for e in entries if e[key] is not None]
            row[key] = statistics.mean(values) if values else None
        final = verdicts["final"]["by_name"].get(method, {})
        robust = verdicts.get("robust_final", {}).get("by_name", {}).get(method, {})
        row.update(final=final.get("mean"), final_interval=final.get("interval"), of_oracle=final.get("of_oracle"),
                   robust_final=robust.get("mean"), robust_final_interval=robust.get("interval"))
        summary.append(row)
    return summary
