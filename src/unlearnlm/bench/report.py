"""The benchmark's report: a markdown page and plots that read without the text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from unlearnlm.evaluation.report import markdown_table

SEMEVAL_7B = [("AILS-NTUA (1st)", 0.706, 0.827, 0.847, 0.443), ("baseline gradient ascent", 0.394, 0.0, 0.912, 0.269),
              ("baseline gradient difference", 0.243, 0.0, 0.382, 0.348), ("baseline KL minimization", 0.395, 0.0, 0.916, 0.269),
              ("baseline NPO", 0.188, 0.021, 0.080, 0.463)]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_bench_report(results: dict, out: Path) -> None:
    verdicts = results["statistics"]
    plots = [plot_draws(verdicts["final"], out / "finals_by_draw.png", "Final score on each reported draw")]
    if verdicts.get("robust_final", {}).get("groups"):
        plots.append(plot_draws(verdicts["robust_final"], out / "robust_finals_by_draw.png",
                                "Robust final on each audited draw"))
    plots += [plot_scores(results, out / "scores.png"), plot_time(results, out / "final_vs_time.png")]
    if results.get("audits"):
        plots += [plot_robust(results, out / "robust_final.png"), plot_attacks(results, out / "attacks.png")]
    trajectory = plot_trajectory(results, out / "sugd_trajectory.png")
    (out / "report.md").write_text(report_markdown(results, plots, trajectory), encoding="utf-8")


def _means(results: dict, key: str) -> dict[str, float | None]:
    """The oracle's and the targets' ``key`` score, mean over the reported draws."""
    def mean(values: list) -> float | None:
        values = [value for value in values if value is not None]
        return sum(values) / len(values) if values else None

    draws = range(len(results["draws"]))
    return {"oracle": mean([scores[key] for scores in results["oracle_scores"]]),
            "target": mean([results["target_scores"][str(draw)][key] for draw in draws])}


def report_markdown(results: dict, plots: list[Path], trajectory: Path | None) -> str:
    verdicts = results["statistics"]
    target_utility = _means(results, "utility")["target"]

    def utility(value: float | None) -> str:
        return f"{_fmt(value)} ({value / target_utility:.0%})" if value is not None and target_utility else _fmt(value)

    columns = ("final", "task_aggregate", "mia_score", "mia_auc", "utility")
    means = {key: _means(results, key) for key in columns}
    rows = [[label, *(_fmt(means[key][name]) for key in columns[:-1]), utility(means["utility"][name]), "", "", ""]
            for name, label in (("oracle", "oracle (retrained without F)"), ("target", "target (before unlearning)"))]
    for row in sorted(results["summary"], key=lambda r: -(r["final"] or 0)):
        rows.append([row["method"], *(_fmt(row[key]) for key in columns[:-1]), utility(row["utility"]),
                     f"{row['wall_seconds']:.1f}", f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "n/a",
                     f"{row['trainable_parameters']:,.0f}"])
    headers = ["method", "final", "task aggregate", "MIA score", "MIA AUC", "utility (of target)", "unlearning s",
               "peak RSS MB", "trainable params"]
    terms_headers = ["method", *results["reported"][0]["scores"]["terms"].keys()] if results["reported"] else []
    terms_rows = [[f"oracle (draw {draw})", *(_fmt(v) for v in scores["terms"].values())]
                  for draw, scores in enumerate(results["oracle_scores"])]
    terms_rows += [[f"{e['method']} (draw {e['draw']}, seed {e['seed']})", *(_fmt(v) for v in e["scores"]["terms"].values())]
                   for e in results["reported"]]
    options = results["options"]
    draws = ", ".join(f"target seed {draw['seed']}" for draw in results["draws"])
    tuning = (f"a grid of learning-rate multipliers {options['grid']} per method, tuned on draw 1 of target seed "
              f"{results['tuning_draw']['seed']}" if results.get("tuning_draw")
              else f"one learning rate per method ({options['grid'][0]} times its centre, not tuned)")
    parts = [
        "# Benchmark results", "",
        f"Size preset `{options['size']}`, {tuning}; {len(results['draws'])} reported draws ({draws}), unlearning seeds "
        f"{options['seeds']} on each; torch kernels {results.get('kernels', 'n/a')}. Total wall time "
        f"{results['wall_seconds'] / 60:.1f} min ({_stages(results)}).", "",
        "## Final score over the reported draws", "",
        "Mean over the draws with its 95% interval from a bootstrap over draws and, within each, documents; the "
        "spread is the standard deviation of the per-draw finals. Paired differences use the same resamples for both "
        "methods. A tie group holds its leader (the best method not in an earlier group) and every method whose "
        "paired interval against the leader contains 0.", "",
        ranking_table(verdicts["final"]), "",
    ]
    robust = verdicts.get("robust_final")
    if robust:
        parts += ["## Robust final", "",
                  "The final built from each term's worst value over `unlearnlm audit`'s attacks (docs/audit.md), on "
                  f"each method's first-seed model and the oracle of the first {robust['draws']} reported draw(s). "
                  + ("Its interval resamples the audited draws only (the attacks' per-document scores are not kept)."
                     if robust.get("groups") else "One audited draw: no interval."), "",
                  ranking_table(robust), ""]
    parts += ["## Scores, means over the reported draws", "", markdown_table(headers, rows), "",
              *[f"![{p.stem}]({p.name})" for p in plots], ""]
    if trajectory:
        parts += [f"![SUGD trajectory]({trajectory.name})", ""]
    parts += ["## Goals", "", markdown_table(["goal", "measured", "met"], goal_checks(results)), ""]
    parts += auto_section(results)
    parts += ["## The 12 terms of each reported run", "", markdown_table(terms_headers, terms_rows), "",
              "## SemEval-2025 Task 4, OLMo-7B board, for scale", "",
              markdown_table(["system", "final", "task aggregate", "MIA score", "MMLU"],
                             [[n, *map(_fmt, v)] for n, *v in SEMEVAL_7B]), ""]
    return "\n".join(parts)


def _stages(results: dict) -> str:
    return "; ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in results.get("timings", {}).items())


def goal_checks(results: dict) -> list[list[str]]:
    """The issue's goals, over the reported draws: the SUGD family first with a paired interval that
    excludes 0 against every other method, its best variant against the oracle, utility, and gd's time.
    SUGD and gd make the same number of passes over the forget set in ``bench.variants``.
    """
    final = results["statistics"]["final"]
    rows = {row["method"]: row for row in results["summary"] if row["final"] is not None}
    sugd = [row for name, row in rows.items() if in_sugd_family(name)]
    if not sugd:
        return []
    best = max(sugd, key=lambda row: row["final"])
    target_utility = _means(results, "utility")["target"]
    oracle_final = final["by_name"]["oracle"]["mean"]
    checks = []
    others = [name for name in rows if not in_sugd_family(name)]
    if others:
        leader = final["best"]
        behind = [name for name in others if name != leader and final["by_name"][name]["paired"]["best"]["interval"][1] < 0]
        checks.append(["a SUGD variant first, every other method behind it (paired 95% interval below 0)",
                       f"first {leader}; resolved behind it: {len(behind)} of {len(others)} non-SUGD methods",
                       _yes(in_sugd_family(leader) and len(behind) == len(others))])
    if oracle_final:
        checks.append(["the best SUGD variant's mean final at least 0.9 of the oracle's",
                       f"{best['method']} {best['final']:.3f} = {best['final'] / oracle_final:.1%} of {oracle_final:.3f}",
                       _yes(best["final"] >= 0.9 * oracle_final)])
    if best["utility"] is not None and target_utility:
        share = best["utility"] / target_utility
        checks.append(["utility at least 90% of the target's", f"{best['method']} {share:.0%}", _yes(share >= 0.9)])
    if "gd" in rows:
        slowest = max(sugd, key=lambda row: row["wall_seconds"])
        checks.append(["SUGD unlearning time at most gd's (same passes over the forget set)",
                       f"SUGD variants {min(r['wall_seconds'] for r in sugd):.1f}-{slowest['wall_seconds']:.1f} s, "
                       f"gd {rows['gd']['wall_seconds']:.1f} s",
                       _yes(slowest["wall_seconds"] <= rows["gd"]["wall_seconds"])])
    return checks


AUTO, LEVEL_VARIANT = "auto", "sugd-level"
AGREEMENT_HALF_WIDTH = 0.15  # the evaluation's MIA "reads as unseen" when its AUC is within 0.5 of this


def auto_runs(results: dict) -> dict[int, dict]:
    """Per reported draw, the first-seed run of ``auto``, of ``sugd-level`` and of the best tuned method
    on that draw, with the oracle's final."""
    by_draw: dict[int, dict] = {}
    for entry in results["reported"]:
        if entry["seed"] == results["options"]["seeds"][0]:
            by_draw.setdefault(entry["draw"], {})[entry["method"]] = entry
    return {draw: runs for draw, runs in sorted(by_draw.items()) if AUTO in runs}


def auto_seconds(entry: Mapping) -> float:
    """auto's whole cost: calibration, probes, chunks, checks and the final check (``auto.seconds``);
    records without it give the engine's time plus the probes'."""
    engine = entry["wall_seconds"] + entry.get("validation_seconds", 0.0)
    return entry.get("auto_seconds") or engine + entry.get("probe_seconds", 0.0)


def auto_section(results: dict) -> list[str]:
    """``--config auto`` against the oracle and the tuned methods, draw by draw: its final, whether its
    verdict agrees with the evaluation's own MIA, and its cost against one ``sugd-level`` run."""
    runs = auto_runs(results)
    if not runs:
        return []
    rows, agreements, costs = [], [], []
    for draw, methods in runs.items():
        auto, oracle = methods[AUTO], results["oracle_scores"][draw]["final"]
        tuned = {name: entry for name, entry in methods.items() if not entry.get("verdict")}
        best = max(tuned, key=lambda name: tuned[name]["scores"]["final"], default=None)
        forgotten, auc = auto["verdict"]["forgotten"], auto["scores"]["mia_auc"]
        unseen_like = abs(auc - 0.5) <= AGREEMENT_HALF_WIDTH
        agreements.append(forgotten == unseen_like)
        level = methods.get(LEVEL_VARIANT)
        cost = auto_seconds(auto) / level["wall_seconds"] if level else None
        costs += [cost] if cost else []
        rows.append([str(draw), _fmt(auto["scores"]["final"]), _fmt(oracle), f"{auto['scores']['final'] / oracle:.0%}",
                     f"{best} {_fmt(tuned[best]['scores']['final'])}" if best else "n/a",
                     "forgotten" if forgotten else "not forgotten", f"{auc:.3f}", _yes(agreements[-1]),
                     f"{auto_seconds(auto):.0f}", f"{level['wall_seconds']:.0f}" if level else "n/a",
                     f"{cost:.2f}x" if cost else "n/a"])
    headers = ["draw", "auto final", "oracle final", "of oracle", "best tuned method", "auto's verdict",
               "evaluation MIA AUC", "agree", "auto s", f"{LEVEL_VARIANT} s", "cost"]
    return ["## `--config auto`, draw by draw", "",
            "The verdict agrees with the evaluation's own MIA when it says *forgotten* exactly when the evaluation's "
            f"MIA AUC lies within 0.5 ± {AGREEMENT_HALF_WIDTH}. auto's time is its whole run (reading the level, the "
            f"rate probes, the chunks and every check); {LEVEL_VARIANT}'s is its unlearning time.", "",
            markdown_table(headers, rows), "", markdown_table(["goal", "measured", "met"],
                                                              auto_goal_checks(results, agreements, costs)), ""]


def auto_goal_checks(results: dict, agreements: list[bool], costs: list[float]) -> list[list[str]]:
    final = results["statistics"]["final"]["by_name"]
    auto, oracle = final[AUTO], final["oracle"]
    tuned = [name for name in final if name not in (AUTO, "oracle")]
    best = max(tuned, key=lambda name: final[name]["mean"], default=None)
    level_spread = final.get(LEVEL_VARIANT, {}).get("spread")
    checks = [["auto's mean final at least 0.9 of the oracle's", f"{auto['mean']:.3f} = {auto['mean'] / oracle['mean']:.1%} "
               f"of {oracle['mean']:.3f}", _yes(auto["mean"] >= 0.9 * oracle["mean"])]]
    if best:
        checks.append(["auto's mean final at least the best tuned method's", f"{auto['mean']:.3f} against {best} "
                       f"{final[best]['mean']:.3f}", _yes(auto["mean"] >= final[best]["mean"])])
    checks.append(["spread over draws (SD), beside sugd-level's", f"auto {_fmt(auto.get('spread'))}, "
                   f"{LEVEL_VARIANT} {_fmt(level_spread)}", "-"])
    checks.append(["the verdict agrees with the evaluation's MIA on at least 80% of draws",
                   f"{sum(agreements)} of {len(agreements)}", _yes(sum(agreements) >= 0.8 * len(agreements))])
    if costs:
        mean_cost = sum(costs) / len(costs)
        checks.append([f"cost at most 2x one {LEVEL_VARIANT} run", f"{mean_cost:.2f}x (mean over draws; "
                       f"{min(costs):.2f}x-{max(costs):.2f}x)", _yes(mean_cost <= 2.0)])
    return checks


def in_sugd_family(name: str) -> bool:
    """The authors' recipe, this project's SUGD variants, and auto (sugd-level calibrated on the target)."""
    return name.startswith("sugd") or name == AUTO


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(results: dict, path: Path) -> Path:
    plt = _pyplot()
    summary = sorted(results["summary"], key=lambda r: -(r["final"] or 0))
    keys = [("final", "final"), ("task_aggregate", "task aggregate"), ("mia_score", "MIA score"), ("utility", "utility")]
    figure, axis = plt.subplots(figsize=(max(7, 1.1 * len(summary) + 3), 4.5))
    width = 0.8 / len(keys)
    for offset, (key, label) in enumerate(keys):
        values = [row[key] or 0 for row in summary]
        positions = [i + offset * width for i in range(len(summary))]
        bars = axis.bar(positions, values, width, label=label)
        for position, value in zip(positions, values):
            if value == 0:  # an empty bar would read as missing
                axis.text(position, 0.01, "0", ha="center", va="bottom", fontsize=7, color=bars.patches[0].get_facecolor())
    target, oracle = _means(results, "final")["target"], _means(results, "final")["oracle"]
    axis.axhline(oracle, color="green", linestyle="-", linewidth=1.5, label=f"oracle final ({oracle:.2f})")
    axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target final ({target:.2f})")
    axis.set_xticks([i + 1.5 * width for i in range(len(summary))], [row["method"] for row in summary], rotation=30, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("score (higher is better)")
    axis.set_title("Unlearning methods on the tiny LUME target")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=6, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_time(results: dict, path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for row in results["summary"]:
        axis.scatter(row["wall_seconds"], row["final"] or 0, s=40)
        axis.annotate(row["method"], (row["wall_seconds"], row["final"] or 0), textcoords="offset points", xytext=(5, 3),
                      fontsize=8)
    oracle = _means(results, "final")["oracle"]
    axis.axhline(oracle, color="green", linewidth=1.5, label=f"oracle final ({oracle:.2f})")
    axis.legend(loc="lower right", fontsize=8)
    axis.set_xlabel("unlearning wall time (s)")
    axis.set_ylabel("final score")
    axis.set_title("Final score against unlearning time")
    axis.set_ylim(0, 1.05)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_trajectory(results: dict, path: Path) -> Path | None:
    """Forget and retain scores after every chunk, one panel per SUGD variant (first seed, reported draw)."""
    series = (("forget_mean", "forget score (lower = more forgotten)"), ("retain_mean", "retain score"), ("final", "final score"))
    # Runs whose log holds these scores: auto's held-out checks are validations too, of other figures.
    runs = [entry for entry in results["reported"]
            if any(key in point for point in entry.get("trajectory") or () for key, _ in series)]
    if not runs:
        return None
    plt = _pyplot()
    columns = min(2, len(runs))
    rows = -(-len(runs) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False, sharey=True)
    for axis, run in zip(axes.flat, runs):
        points = run["trajectory"]
        chunks = [point["chunk"] for point in points]
        for key, label in series:
            if all(point.get(key) is not None for point in points):
                axis.plot(chunks, [point[key] for point in points], marker="o", label=label)
        axis.set_xticks(chunks)
        axis.set_ylim(0, 1.05)
        axis.set_title(run["method"], fontsize=10)
        axis.set_xlabel("after chunk")
        axis.set_ylabel("score")
    for axis in list(axes.flat)[len(runs):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    figure.suptitle("SUGD through the chunks (reported draw, validation log)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_robust(results: dict, path: Path) -> Path:
    """Plain against robust final per audited model: how much the attacks take back."""
    plt = _pyplot()
    audits = results["audits"][0]  # the first audited draw
    names = sorted(audits, key=lambda name: -audits[name]["worst_case"]["plain"]["final"])
    plain = [audits[name]["worst_case"]["plain"]["final"] for name in names]
    worst = [audits[name]["worst_case"]["final"] for name in names]
    figure, axis = plt.subplots(figsize=(max(7, 0.9 * len(names) + 3), 4.5))
    positions = range(len(names))
    axis.bar([i - 0.2 for i in positions], plain, 0.4, label="final (greedy, no attack)")
    axis.bar([i + 0.2 for i in positions], worst, 0.4, label="robust final (worst over the attacks)")
    axis.set_xticks(list(positions), names, rotation=30, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("score (higher is better)")
    axis.set_title("Final score with and without the audit's attacks (first audited draw, seed 0)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_attacks(results: dict, path: Path) -> Path:
    """Per attack, the forget score each method's model gives back, with the oracle's as a black mark:
    what the attack gives a model that never saw F; above it is the leak."""
    plt = _pyplot()
    audits = results["audits"][0]  # the first audited draw
    methods = [name for name in audits if name != "oracle"]
    attacks = list(next(iter(audits.values()))["attacks"])
    figure, axis = plt.subplots(figsize=(max(8, 1.3 * len(attacks) + 3), 4.8))
    width = 0.8 / max(1, len(methods))
    for offset, method in enumerate(methods):
        values = [audits[method]["attacks"][attack]["forget_score"] for attack in attacks]
        axis.bar([i - 0.4 + (offset + 0.5) * width for i in range(len(attacks))], values, width, label=method,
                 color=plt.get_cmap("tab20")(offset % 20))  # the default cycle repeats after 10 methods
    if "oracle" in audits:  # a worker process of a --jobs run leaves the oracle to its parent
        oracle = [audits["oracle"]["attacks"][attack]["forget_score"] for attack in attacks]
        axis.scatter(range(len(attacks)), oracle, marker="_", s=900, color="black", zorder=3, label="oracle")
    axis.set_xticks(range(len(attacks)), attacks, rotation=20, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("forget score under attack\n(higher = more recalled)")
    axis.set_title("What each attack recovers, against the oracle")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(6, len(methods) + 1), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _with_interval(value: float | None, interval: Sequence[float] | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    form = "{:+.3f}" if signed else "{:.3f}"
    text = form.format(value)
    return f"{text} [{form.format(interval[0])}, {form.format(interval[1])}]" if interval else text


def ranking_table(verdict: Mapping, oracle: str = "oracle") -> str:
    """One score's ranking over the reported draws (``bench.statistics``): tie group, mean and interval,
    spread, share of the oracle, paired differences, and the per-draw values; the oracle first."""
    by_name = verdict["by_name"]
    reference = verdict.get("reference")
    groups = verdict.get("groups") or [[name for name in sorted(by_name, key=lambda n: -by_name[n]["mean"])
                                        if name != oracle]]
    headers = ["tie group", "method", "mean [95% CI]", "spread (SD over draws)", "of oracle [95% CI]",
               "vs best [95% CI]", f"vs {reference} [95% CI]" if reference else None, "per draw"]
    rows = []
    for rank, name in [(None, oracle)] + [(rank, name) for rank, group in enumerate(groups, 1) for name in group]:
        row = by_name[name]
        paired = row.get("paired", {})
        share = row.get("of_oracle")
        cells = ["" if rank is None else str(rank) if verdict.get("groups") else "-", name,
                 _with_interval(row["mean"], row.get("interval")), _fmt(row.get("spread")),
                 "" if name == oracle or not share else
                 f"{share['share']:.1%} [{share['interval'][0]:.1%}, {share['interval'][1]:.1%}]",
                 _paired(paired.get("best")), _paired(paired.get(reference)) if reference else None,
                 ", ".join(f"{value:.3f}" for value in row["finals_by_draw"])]
        rows.append([cell for cell in cells if cell is not None])
    return markdown_table([header for header in headers if header is not None], rows)


def _paired(entry: Mapping | None) -> str:
    if not entry:
        return ""
    return f"{_with_interval(entry['difference'], entry['interval'], signed=True)} ({entry['against']})"


def plot_draws(verdict: Mapping, path: Path, title: str, oracle: str = "oracle") -> Path:
    """Every method's value on each reported draw (dots), its mean and 95% interval (bar), best first;
    the oracle's mean as a line."""
    plt = _pyplot()
    by_name = verdict["by_name"]
    names = sorted((name for name in by_name if name != oracle), key=lambda name: -by_name[name]["mean"])
    figure, axis = plt.subplots(figsize=(max(7, 0.8 * len(names) + 3), 4.5))
    for position, name in enumerate(names):
        row = by_name[name]
        values = row["finals_by_draw"]
        axis.scatter([position] * len(values), values, s=18, color="tab:blue", alpha=0.7,
                     label="a reported draw" if position == 0 else None)
        low, high = row.get("interval") or (row["mean"], row["mean"])
        axis.errorbar(position + 0.18, row["mean"], yerr=[[row["mean"] - low], [high - row["mean"]]], fmt="o",
                      color="black", capsize=3, label="mean, 95% interval" if position == 0 else None)
    axis.axhline(by_name[oracle]["mean"], color="green", linewidth=1.5, label=f"oracle mean ({by_name[oracle]['mean']:.2f})")
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("score (higher is better)")
    axis.set_title(title)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
