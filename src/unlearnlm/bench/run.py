"""`unlearnlm bench`: every method on the same tiny target, the same sets and the same tuning effort.

Protocol (docs/benchmark.md): each method variant tries the same number of configurations on a
tuning draw of documents (its own target, trained the same way), the best by final score is then run
on every reported draw (each its own target and oracle, from other documents with another
fine-tuning order: target seed ``target_seed + k`` for reported draw ``k``), once per seed. With one
configuration (a grid of one) there is nothing to choose, so the tuning draw is neither built nor
run. Every unlearning run is a separate process, so its peak memory is its own. Nothing is tuned on
a reported draw; the SUGD trajectory is logged on the first with validation in log-only mode (no
state selection), on the first seed of the variants in ``TRAJECTORY_VARIANTS``. The verdicts over
the draws are ``bench.statistics``'s.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unlearnlm.bench.scoring import audited, cached, evaluation_data, forget_level, retain_set, score
from unlearnlm.bench.sizes import get_size
from unlearnlm.bench.variants import Variant, variants
from unlearnlm.errors import UserError

TUNE_DRAW, REPORT_DRAW = 1, 0  # which block of a seed's document order (data.sets)
TUNE = "tune"  # the tuning draw's key among the draws; the reported ones are 0, 1, ...


@dataclass
class BenchOptions:
    out: Path
    size: str = "bench"
    methods: list[str] = field(default_factory=list)
    grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # learning-rate multipliers
    seeds: list[int] = field(default_factory=lambda: [0])
    target_seed: int = 0
    time_budget_s: float | None = None
    batch_size: int = 16
    trajectory: bool = True
    # Attack the first seed's model of every method, and the oracle (``unlearnlm audit``'s attacks).
    audit: bool = True
    # Processes running methods side by side (``in_processes``); the report is the same.
    jobs: int = 1
    audit_oracle: bool = True  # off in the worker processes: their parent audits the oracle once
    draws: int = 3  # reported draws
    audit_draws: int = 1  # the first reported draws whose models are attacked


# The SUGD variants whose reported run logs validation scores after every chunk (the trajectory
# plot): the authors' recipe and this project's preset. Each logged chunk costs a full evaluation.
TRAJECTORY_VARIANTS = ("sugd", "sugd-level")


def run_unlearn(model: Path, forget: Path, retain: Path, out: Path, overrides: list[str], log: Path) -> dict:
    """One unlearning run of ``model`` (``api.unlearn``) in a process of its own, so that its peak memory
    is its own; its output goes to ``log``. Returns its run.json."""
    if not in_own_process(_unlearn, (model, forget, retain, out, overrides), log):
        raise UserError(f"unlearning failed ({' '.join(overrides)}); see {log}")
    return json.loads((out / "run.json").read_text())


def _unlearn(model: Path, forget: Path, retain: Path, out: Path, overrides: list[str]) -> None:
    from unlearnlm.api import unlearn
    from unlearnlm.bench.target import BENCHMARK_DIR
    from unlearnlm.data.sets import write_unseen

    # --config auto reads the target's unseen documents (only a target has them; auto has no settle run)
    unseen = write_unseen(model / BENCHMARK_DIR) if "auto.enabled=true" in overrides else None
    unlearn(model, forget, retain, out, overrides=overrides, overwrite=True, unseen=unseen)


def in_own_process(function: Callable, args: tuple, log: Path, threads: int | None = None) -> bool:
    """``function(*args)`` in a spawned process (nothing of this one's torch state is copied), its output
    and any traceback written to ``log``; ``threads``: its torch threads. True when it succeeded."""
    process = multiprocessing.get_context("spawn").Process(target=_logged, args=(function, args, str(log), threads))
    process.start()
    process.join()
    return process.exitcode == 0


def _logged(function: Callable, args: tuple, log: str, threads: int | None) -> None:
    """The body of ``in_own_process``'s process."""
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 1)  # the process's own stdout and stderr, for the libraries' output too
        os.dup2(handle.fileno(), 2)
    if threads is not None:  # for this process, and through the environment for the ones it starts
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    function(*args)  # a failure's traceback goes to the log and the exit code is 1 (multiprocessing's own)


def finished_run(run_dir: Path, target: Path, forget: Path, overrides: list[str],
                 scorer: Callable[[Path], dict], settle: tuple[str, ...] | None = None,
                 batch_size: int = 16) -> tuple[dict, dict]:
    """``(run.json, scores)`` of one unlearning run (two with ``settle``: see ``settle_run``), reusing a
    finished one with the same target and settings.

    A record is written only after the run and its scoring finish, so a bench killed midway and started
    again with the same command redoes only the run it was in.
    """
    def run_and_score() -> dict:
        log = run_dir.with_name(run_dir.name + ".log")
        if settle is None:
            run = run_unlearn(target, forget, retain_set(target), run_dir, overrides, log)
        else:
            run = settle_run(target, forget, run_dir, overrides, settle, batch_size)
        return {"run": run, "scores": scorer(run_dir)}

    record_path = run_dir.with_name(run_dir.name + ".done.json")
    if not (run_dir / "run.json").is_file():
        record_path.unlink(missing_ok=True)  # the model it described is gone
    key = {"target": str(target), "forget": str(forget), "overrides": overrides}
    done = cached(record_path, key if settle is None else {**key, "settle": list(settle)}, run_and_score)
    return done["run"], done["scores"]


def settle_run(target: Path, forget: Path, run_dir: Path, overrides: list[str], settle: tuple[str, ...],
               batch_size: int) -> dict:
    """The first run (``overrides``) into ``<run_dir>-first``, then ``settle``'s run from its model into
    ``run_dir``, with the first's learning rate and seed and ``forget_target`` set to the first model's
    level (``forget_level``); the run record adds up both runs' steps and times."""
    first_dir = run_dir.with_name(run_dir.name + "-first")
    retain = retain_set(target)  # the target's, for both runs: the first model has no sets of its own
    first = run_unlearn(target, forget, retain, first_dir, overrides, first_dir.with_name(first_dir.name + ".log"))
    level = forget_level(target, batch_size, model=first_dir)
    carried = [item for item in overrides if item.startswith(("optim.lr=", "seed=", "optim.time_budget_s="))]
    second = run_unlearn(first_dir, forget, retain, run_dir, [*settle, *carried, f"method_args.forget_target={level:.4f}"],
                         run_dir.with_name(run_dir.name + ".log"))
    record = {**second, "settle_level": level, "first": {key: first[key] for key in ("steps", "wall_seconds", "stopped_reason")}}
    for key in ("steps", "wall_seconds", "validation_seconds"):
        record[key] = first.get(key, 0) + second.get(key, 0)
    record["peak_rss_mb"] = max(first.get("peak_rss_mb") or 0, second.get("peak_rss_mb") or 0) or None
    return record


@dataclass
class Stage:
    """What every method's runs share: the options, the targets by draw, their evaluation data and
    forget levels, and where the run records go."""

    options: BenchOptions
    targets: dict[str | int, Path]  # by draw: TUNE and the reported draws 0, 1, ...
    data: dict
    levels: dict[str | int, float]
    runs_dir: Path
    console: object

    def budget(self) -> list[str]:
        return [f"optim.time_budget_s={self.options.time_budget_s}"] if self.options.time_budget_s else []

    def level(self, variant: Variant, draw: str | int) -> list[str]:
        return [f"method_args.{variant.level_setting}={self.levels[draw]:.4f}"] if variant.level_setting else []

    def forget(self, draw: str | int) -> Path:
        return self.targets[draw] / "benchmark" / "forget.jsonl"

    def full_score(self, model_dir: Path, draw: str | int, name: str) -> dict:
        """Every score of a target or an oracle, with the bootstrap's inputs, computed once."""
        return cached(self.runs_dir / f"{name}.scores.json", {"model": str(model_dir)},
                      lambda: score(model_dir, self.data[draw], self.options.batch_size, full=True))


def draw_specs(options: BenchOptions, tuned: bool) -> dict[str | int, dict]:
    """The targets by draw: the tuning draw's (when ``tuned``; no oracle, since its scores never meet
    one) and reported draw ``k``'s, of target seed ``target_seed + k``."""
    size = get_size(options.size)
    specs: dict[str | int, dict] = {}
    if tuned:
        specs[TUNE] = {"size": size, "seed": options.target_seed, "draw": TUNE_DRAW, "with_oracle": False}
    for draw in range(options.draws):
        specs[draw] = {"size": size, "seed": options.target_seed + draw, "draw": REPORT_DRAW, "with_oracle": True}
    return specs


def run_bench(options: BenchOptions) -> dict:
    from rich.console import Console

    from unlearnlm.bench.report import write_bench_report
    from unlearnlm.bench.statistics import draw_statistics, summarize
    from unlearnlm.bench.target import ORACLE_DIR, cached_target
    from unlearnlm.kernels import kernels

    console = Console()
    started = time.perf_counter()
    chosen, calibrating = chosen_methods(options)
    # No tuning draw when there is nothing to tune: one rate, or only variants that calibrate themselves (auto).
    specs = draw_specs(options, tunes(options.grid) and not calibrating)
    reported = range(options.draws)
    if options.jobs > 1:
        in_processes(options, [{"target": spec} for spec in specs.values()], "targets")
    targets = {key: cached_target(**spec)[0] for key, spec in specs.items()}
    oracles = {draw: targets[draw] / ORACLE_DIR for draw in reported}
    timings = {"models": time.perf_counter() - started}
    runs_dir = options.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    stage = Stage(options, targets, {key: evaluation_data(path) for key, path in targets.items()}, {}, runs_dir, console)
    results: dict = {
        "options": _jsonable(options), "kernels": kernels(), "targets": {str(key): str(path) for key, path in targets.items()},
        "draws": [{"seed": specs[draw]["seed"], "draw": REPORT_DRAW, "target": str(targets[draw]),
                   "oracle": str(oracles[draw])} for draw in reported],
        "tuning_draw": {"seed": specs[TUNE]["seed"], "draw": TUNE_DRAW, "target": str(targets[TUNE])} if TUNE in specs else None,
        "target_scores": {str(key): stage.full_score(path, key, f"target-{key}") for key, path in targets.items()},
        "oracle_scores": [stage.full_score(oracles[draw], draw, f"oracle-{draw}") for draw in reported],
        "tuning": [], "reported": []}
    stage.levels.update({key: cached(runs_dir / f"level-{key}.json", {"target": str(path)},
                                     lambda path=path: {"level": forget_level(path, options.batch_size)})["level"]
                         for key, path in targets.items()})
    results["forget_levels"] = {str(key): level for key, level in stage.levels.items()}
    timings["scoring the targets and oracles"] = time.perf_counter() - started - timings["models"]
    audit_draws = range(min(options.audit_draws, options.draws)) if options.audit else range(0)
    if options.jobs > 1:  # the workers read the scores and levels above from their records
        in_processes(options, worker_tasks(options, chosen, oracles, targets, audit_draws), "methods")
    table = variants(json.loads((targets[0] / "config.json").read_text())["num_hidden_layers"])
    for name in chosen:
        tried, runs = method_runs(stage, table[name])
        results["tuning"] += tried
        results["reported"] += runs
    results["audits"] = [audit_models(results, oracles[draw] if options.audit_oracle else None, draw, stage)
                         for draw in audit_draws]
    timings["methods and audits"] = time.perf_counter() - started - sum(timings.values())
    results["statistics"] = draw_statistics(results["reported"], results["oracle_scores"], results["audits"])
    results["summary"] = summarize(results)  # bench.statistics
    results["wall_seconds"] = time.perf_counter() - started
    results["timings"] = timings
    (options.out / "results.json").write_text(json.dumps(results, indent=2))
    write_bench_report(results, options.out)
    return results


def chosen_methods(options: BenchOptions) -> tuple[list[str], bool]:
    """``(the variants to run, whether every one of them calibrates itself)``."""
    known = variants(n_layers=1)  # the names do not depend on the depth
    chosen = options.methods or [name for name, variant in known.items() if variant.default]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise UserError(f"unknown bench method {unknown[0]!r} (known: {', '.join(known)})")
    return chosen, all(known[name].calibrates for name in chosen)


def worker_tasks(options: BenchOptions, chosen: list[str], oracles: dict, targets: dict, audit_draws: range) -> list[dict]:
    """The methods stage's tasks for ``in_processes``: one bench of each method, and the oracles' audits."""
    tasks = [{"bench": {**_jsonable(options), "methods": [name], "jobs": 1, "audit_oracle": False}} for name in chosen]
    if options.audit_oracle:
        tasks += [{"audit": {"model": str(oracles[draw]), "target": str(targets[draw]),
                             "record": str(options.out / "runs" / f"oracle-{draw}.audit.json"), "batch_size": options.batch_size}}
                  for draw in audit_draws]
    return tasks


def method_runs(stage: Stage, variant: Variant) -> tuple[list[dict], list[dict]]:
    """``(tuning entries, reported entries)`` of one variant: its grid on the tuning draw (when there is
    a grid to choose from), then the best rate on every reported draw, once per seed."""
    options, name, batch_size = stage.options, variant.name, stage.options.batch_size
    tried = []
    for multiplier in options.grid if tunes(options.grid) and not variant.calibrates else ():
        overrides = variant.at_rate(multiplier) + stage.budget()
        run, scores = finished_run(stage.runs_dir / f"{name}-tune-x{multiplier}", stage.targets[TUNE],
                                   stage.forget(TUNE), overrides + stage.level(variant, TUNE),
                                   lambda directory: score(directory, stage.data[TUNE], batch_size, full=False),
                                   variant.settle, batch_size)
        tried.append({"method": name, "lr_multiplier": multiplier, "overrides": overrides, **_run_facts(run),
                      "scores": scores})
        stage.console.print(f"[dim]tune[/] {name} lr x{multiplier}: final {_fmt(scores['final'])}")
    # The first of the best-scoring rates; without tuning, the one configuration there is.
    best = max(tried, key=lambda entry: entry["scores"]["final"],
               default={"lr_multiplier": None if variant.calibrates else options.grid[0],
                        "overrides": variant.at_rate(options.grid[0]) + stage.budget()})
    reported = []
    for draw in range(options.draws):
        for seed in options.seeds:
            overrides = [*best["overrides"], f"seed={seed}", *stage.level(variant, draw)]
            if options.trajectory and name in TRAJECTORY_VARIANTS and seed == options.seeds[0] and draw == 0:
                overrides += _trajectory_overrides(stage.targets[draw])
            run_dir = reported_dir(stage.runs_dir, name, draw, seed)
            run, scores = finished_run(run_dir, stage.targets[draw], stage.forget(draw), overrides,
                                       lambda directory, draw=draw: score(directory, stage.data[draw], batch_size, full=True,
                                                                          keep=_results_path(directory)),
                                       variant.settle, batch_size)
            reported.append({"method": name, "draw": draw, "seed": seed, "lr_multiplier": best["lr_multiplier"],
                             "overrides": overrides, **_run_facts(run), "scores": scores, "trajectory": _trajectory(run_dir)})
            stage.console.print(f"[bold]{name}[/] draw {draw} seed {seed}: final {_fmt(scores['final'])}, "
                                f"task {_fmt(scores['task_aggregate'])}, MIA {_fmt(scores['mia_score'])}, "
                                f"utility {_fmt(scores['utility'])}, {run['wall_seconds']:.0f}s")
    return tried, reported


def reported_dir(runs_dir: Path, method: str, draw: int, seed: int) -> Path:
    return runs_dir / f"{method}-d{draw}-seed{seed}"


def tunes(grid: list[float]) -> bool:
    """Whether the bench tunes on the tuning draw: only when there is more than one configuration to try."""
    return len(grid) > 1


def audit_models(results: dict, oracle: Path | None, draw: int, stage: Stage) -> dict:
    """The oracle's (unless None) and every method's audit (the first reported seed's model of each) on
    reported draw ``draw``."""
    batch_size, data = stage.options.batch_size, stage.data[draw]
    audits = {"oracle": audited(oracle, data, stage.runs_dir / f"oracle-{draw}.audit.json", batch_size)} if oracle else {}
    first = {}
    for entry in results["reported"]:
        if entry["draw"] == draw:
            first.setdefault(entry["method"], entry)
    for method, entry in first.items():
        run_dir = reported_dir(stage.runs_dir, method, draw, entry["seed"])
        audits[method] = audited(run_dir, data, run_dir.with_name(run_dir.name + ".audit.json"), batch_size,
                                 _results_path(run_dir))
        worst = audits[method]["worst_case"]
        stage.console.print(f"[bold]{method}[/] draw {draw} audited: final {_fmt(worst['plain']['final'])}, "
                            f"robust final {_fmt(worst['final'])}")
    return audits


def in_processes(options: BenchOptions, tasks: list[dict], stage: str) -> None:
    """Run ``tasks`` (``_worker``'s) in at most ``options.jobs`` processes at a time, each with an equal
    share of the cores: the draws' targets, then one process per method (and the oracle's audit), the
    next starting as soon as one ends, so that the processes finish close together. They leave run and
    audit records that the calling process reads back to write the report, as a one-process run would."""
    from concurrent.futures import ThreadPoolExecutor

    from unlearnlm.bench.base import cached_base
    from unlearnlm.data.sets import bundled_lume_dir

    if stage == "targets":
        cached_base(bundled_lume_dir(), get_size(options.size), "llama")  # the draws' targets share it: built once, here
    slots = min(options.jobs, len(tasks))
    configured = os.environ.get("OMP_NUM_THREADS")
    threads = int(configured) if configured else max(1, (os.cpu_count() or 1) // slots)
    options.out.mkdir(parents=True, exist_ok=True)

    def run_task(index: int) -> Path | None:
        log = options.out / f"worker-{stage}-{index}.log"
        return None if in_own_process(_worker, (tasks[index],), log, threads) else log

    with ThreadPoolExecutor(max_workers=slots) as pool:
        failed = [log for log in pool.map(run_task, range(len(tasks))) if log is not None]
    if failed:
        raise UserError(f"a bench worker failed; see {failed[0]}")


def _worker(task: dict) -> None:
    """One worker process of ``in_processes``."""
    from unlearnlm.bench.target import cached_target

    if "target" in task:
        cached_target(**task["target"])
        return
    if "audit" in task:
        spec = task["audit"]
        audited(Path(spec["model"]), evaluation_data(Path(spec["target"])), Path(spec["record"]), spec["batch_size"])
        return
    spec = task["bench"]
    run_bench(BenchOptions(**{**spec, "out": Path(spec["out"])}))


def _results_path(run_dir: Path) -> Path:
    """Where the bench keeps a reported model's whole evaluation results, beside its run directory."""
    return run_dir.with_name(run_dir.name + ".results.json")


def _trajectory_overrides(target: Path) -> list[str]:
    sets = target / "benchmark"
    return [f"validation.forget={sets / 'forget.jsonl'}", f"validation.retain={sets / 'retain.jsonl'}",
            f"validation.members={sets / 'mia_members.jsonl'}", f"validation.nonmembers={sets / 'mia_nonmembers.jsonl'}",
            f"validation.general={sets / 'general.jsonl'}", "validation.select=false"]


def _trajectory(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "unlearn_log.jsonl").read_text().splitlines())
    return [row for row in rows if row.get("event") == "validation"]


def _run_facts(run: dict) -> dict:
    # Unlearning time only: the trajectory run's per-chunk validation is logging, not unlearning.
    return {"wall_seconds": run["wall_seconds"] - run.get("validation_seconds", 0.0), "peak_rss_mb": run.get("peak_rss_mb"),
            "peak_gpu_allocated_mb": run.get("peak_gpu_allocated_mb"), "trainable_parameters": run["trainable_parameters"],
            "steps": run["steps"], "stopped_reason": run["stopped_reason"], **_auto_facts(run)}


def _auto_facts(run: dict) -> dict:
    """A calibrating run's verdict and what its calibration cost (the report's auto section)."""
    if "verdict" not in run:
        return {}
    return {"verdict": run["verdict"], "validation_seconds": run.get("validation_seconds", 0.0),
            "probe_seconds": run["auto"].get("probe_seconds", 0.0), "auto_seconds": run["auto"].get("seconds")}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _jsonable(options: BenchOptions) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.__dict__.items()}

