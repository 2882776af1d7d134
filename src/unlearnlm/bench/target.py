"""The tiny benchmark's models: a pretrained base, a target that memorized LUME, and a retrain oracle.

The SemEval-2025 Task 4 targets were pretrained models (OLMo, on a web corpus holding Wikipedia)
fine-tuned on the LUME documents until they memorized them. The project makes its own, the same way,
at a size two CPU cores can train:

1. **Base**: a small Llama (or OLMo) with a byte-level BPE tokenizer, trained from random
   initialization for a fixed budget on the pool P (``data.sets.pretraining_pool``). It learns the
   language and the kinds of documents, not their answers. P does not depend on the draw, so one base
   serves every draw and seed of a data directory (``cached_base``); the base of the bundled data
   ships inside the package (``resources/base``).
2. **Target**: the base fine-tuned on F, R and G until it recalls every answer.
3. **Oracle**: the base fine-tuned on R and G only, with the same recipe for the same number of
   optimizer steps: what exact unlearning (retraining without F) gives, the ceiling for every method.

Fine-tuning trains on whole rows (``input``, a space, ``output``, EOS; the prompt too, as the MIA
members are whole documents) and replays pool text alongside, so that memorizing a few hundred rows
does not wash out the language the base learned: without replay, unseen biographies became twice as
costly to the target as to the base, a member/nonmember gap far wider than a real model's.

The target stops as soon as it recalls every answer (``fitting.measure_memorization``); the models
are then scored as the benchmark scores them and calibrated (``calibration.calibration_checks``).

Where each part lives: the sizes and recipes in ``sizes.py``, the base in ``base.py``, the fitting
loop in ``fitting.py``, the calibration in ``calibration.py``; this module builds and caches the
target and its oracle.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from unlearnlm import __version__
from unlearnlm.bench.base import (
    ARCHS,
    BASE_LOG,
    CPU_THREADS,
    TARGET_FORMAT,
    Arch,
    cache_root,
    cached_base,
    data_fingerprint,
    load_base,
    save_model_dir,
)
from unlearnlm.bench.calibration import calibration_record
from unlearnlm.bench.fitting import (
    Memorization,
    Schedule,
    TargetStop,
    fit,
    measure_memorization,
    progress_bar,
    text_example,
    torch_threads,
    training_text,
)
from unlearnlm.bench.sizes import Recipe, Size, SizePreset, get_size
from unlearnlm.data.records import Record
from unlearnlm.data.sets import (
    MANIFEST_NAME,
    BenchmarkSets,
    bundled_lume_dir,
    draw_sets,
    pool_texts,
    pretraining_pool,
    write_sets,
    write_unseen,
)
from unlearnlm.data.tokenize import Example, encode_example
from unlearnlm.errors import UserError
from unlearnlm.kernels import kernels
from unlearnlm.model import default_device
from unlearnlm.paths import check_output_dir, replace_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast
BENCHMARK_DIR = "benchmark"
ORACLE_DIR = "oracle"
LOG_NAME = "target.json"


def epoch_steps(recipe: Recipe, rows: int) -> int:
    """Optimizer steps in one fine-tuning epoch over ``rows`` rows and their replayed pool text."""
    return -(-(rows + round(recipe.replay * rows)) // recipe.batch_size)


def fine_tune_schedules(recipe: Recipe, target_rows: int, oracle_rows: int) -> tuple[Schedule, Schedule]:
    """The target's schedule, and the oracle's: the same learning-rate curve step for step, with as
    many (shorter) epochs as that curve spans, since the oracle may have to go on after the target's
    last step until it recalls R and G."""
    per_epoch = epoch_steps(recipe, target_rows)
    target = Schedule(recipe.lr, recipe.batch_size, recipe.warmup_epochs * per_epoch, recipe.max_epochs * per_epoch,
                      recipe.max_grad_norm, recipe.max_epochs)
    return target, replace(target, max_epochs=-(-target.horizon // epoch_steps(recipe, oracle_rows)))


def fine_tune(
    base_dir: Path, pool_text: Sequence[str], rows: Sequence[Record], check_rows: Sequence[Record] | None,
    recipe: Recipe, seed: int, show_progress: bool, label: str, schedule: Schedule,
    target_stop: TargetStop | None = None, on_check: Callable[[int, bool], None] | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """The base fine-tuned on ``rows`` with ``pool_text`` replayed until ``check_rows`` are recalled.

    The oracle (``target_stop``) follows the target's schedule step for step and is checked from the
    target's last step on, every epoch; the target is checked every ``recipe.check_every`` epochs and
    tells ``on_check`` each outcome.
    """
    model, tokenizer = load_base(base_dir)
    pool = [text_example(tokenizer, text) for text in pool_text]
    train = [text_example(tokenizer, training_text(row)) for row in rows]
    replayed = round(recipe.replay * len(train))

    def epoch_examples(epoch: int) -> list[Example]:
        return train + random.Random(f"replay:{seed}:{epoch}").sample(pool, replayed)

    done = None
    memorization: list[Memorization] = []
    every = 1 if target_stop is not None else recipe.check_every
    if check_rows is not None:
        # Labels on the answer and its EOS only: what greedy generation must reproduce. The EOS is kept
        # (unlike unlearning rows, which follow ``append_eos``): the target must learn where each
        # answer stops, or greedy generation runs on.
        check = [encode_example(tokenizer, row.input, row.output, append_eos=True) for row in check_rows]

        def done(epoch: int) -> str | None:
            if epoch % every and epoch != schedule.max_epochs:
                return None
            memorization.append(measure_memorization(model, check, tokenizer.pad_token_id))
            return f"{memorization[-1].rows_recalled}/{memorization[-1].rows}"

    started = time.perf_counter()
    with progress_bar(show_progress, label) as progress:
        log = fit(model, epoch_examples, tokenizer.pad_token_id, schedule, seed, done, progress, target_stop, on_check)
    log.update(train_seconds=time.perf_counter() - started, rows=len(train), replayed_per_epoch=replayed,
               schedule=asdict(schedule))
    if memorization:
        log.update(rows_recalled=memorization[-1].rows_recalled, answer_token_accuracy=memorization[-1].token_accuracy)
    return model, tokenizer, log


class QueuedVerdicts:
    """``TargetStop.verdict`` for an oracle training alongside its target: the target's process puts
    ``(epoch, stopped)`` on ``queue`` after each check; asking for an epoch waits for its check, and
    ends this process if the target's is gone (killed), rather than wait for ever."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.heard: dict[int, bool] = {}
        self.parent = os.getppid()

    def __call__(self, epoch: int) -> bool:
        while epoch not in self.heard:
            try:
                checked, stopped = self.queue.get(timeout=5)
            except queue.Empty:
                if os.getppid() != self.parent:
                    raise SystemExit("the target's process is gone") from None
                continue
            self.heard[checked] = stopped
        return self.heard[epoch]


def _train_oracle(job: dict, queue, out_dir: Path) -> None:
    """The oracle's process (``OracleAlongside``): train, then save the model and its log to ``out_dir``."""
    torch.set_num_threads(job.pop("threads"))
    stop = TargetStop(**job.pop("stop"), verdict=QueuedVerdicts(queue))
    model, tokenizer, log = fine_tune(**job, show_progress=False, label="oracle", target_stop=stop)
    save_model_dir(out_dir, model, tokenizer)
    (out_dir / "fit.json").write_text(json.dumps(log))


class OracleAlongside:
    """The oracle trained in a second process while the target trains in this one, told after each
    of the target's checks whether it stopped: the same steps and weights as training it after the
    target, in about half the time on two cores."""

    def __init__(self, job: dict, work_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")  # no forked copy of this process's torch state
        self.out_dir = work_dir
        self.queue = context.Queue()
        self.process = context.Process(target=_train_oracle, args=(job, self.queue, work_dir), daemon=True)

    def __enter__(self) -> OracleAlongside:
        self.process.start()
        return self

    def heard(self, epoch: int, stopped: bool) -> None:
        self.queue.put((epoch, stopped))

    def result(self) -> tuple[torch.nn.Module, dict]:
        self.process.join()
        if self.process.exitcode != 0:
            raise RuntimeError(f"the oracle's training process failed (exit code {self.process.exitcode})")
        model, _ = load_base(self.out_dir)
        log_path = self.out_dir / "fit.json"
        log = json.loads(log_path.read_text())
        log_path.unlink()  # the log goes into target.json; the directory keeps only the model
        return model, log

    def __exit__(self, *exc_info) -> None:
        if self.process.is_alive():  # the target failed: the oracle would wait for it forever
            self.process.terminate()
        self.process.join()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_target(
    data_dir: str | Path | None,
    out_dir: str | Path,
    size: str | Size = "mini",
    seed: int = 0,
    arch: Arch = "llama",
    draw: int = 0,
    overwrite: bool = False,
    max_epochs: int | None = None,
    calibrate: bool = True,
    show_progress: bool = True,
    threads: int = CPU_THREADS,
    with_oracle: bool = True,
) -> dict:
    """Build the target in ``out_dir`` and the oracle in ``out_dir/oracle``; returns the log saved as
    ``target.json``. The base comes from ``cached_base``. ``with_oracle=False`` builds no oracle (the
    bench's tuning draw, whose scores never meet one).

    ``max_epochs`` overrides the size's fine-tuning budget. ``calibrate=False`` skips scoring the
    models (only the teacher-forced recall decides). Raises ``UserError`` when the target does not
    memorize its sets or a calibration bar is missed, naming each one and by how much.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    size = get_size(size)
    preset, recipe = size.sets, resolve_recipe(size.recipe, max_epochs)
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(data_dir) if data_dir is not None else bundled_lume_dir()
    sets = draw_sets(root, preset, seed, draw)

    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with torch_threads(threads):
            base_dir, base_built = cached_base(root, size, arch, show_progress, threads)
            base_seconds = time.perf_counter() - started
            target, tokenizer, target_log, oracle, oracle_log = train_target_and_oracle(
                base_dir, pool_texts(pretraining_pool(root)), sets, recipe, seed, show_progress, threads,
                staging / ORACLE_DIR if with_oracle else None)
            checked = time.perf_counter()
            calibration = calibration_record(base_dir, target, oracle, tokenizer, sets,
                                             f"{preset.name} models of draw {draw}, seed {seed}", calibrate)
        log = {
            "base": {"directory": str(base_dir), "built": base_built, "seconds": base_seconds,
                     **json.loads((base_dir / BASE_LOG).read_text())},
            "target": target_log, "oracle": oracle_log, "check_seconds": time.perf_counter() - checked,
            "unlearnlm_version": __version__, "preset": asdict(preset), "recipe": asdict(recipe), "arch": arch,
            "seed": seed, "draw": draw, "parameters": sum(parameter.numel() for parameter in target.parameters()),
            "torch_threads": threads, "device": str(default_device()), "kernels": kernels(),
        }
        save_model_dir(staging, target, tokenizer)
        models = {"target": ".", "oracle": ORACLE_DIR if with_oracle else None, "base": str(base_dir),
                  "base_weights_sha256": log["base"]["weights_sha256"]}
        write_sets(sets, staging / BENCHMARK_DIR, {"models": models, "calibration": calibration})
        write_unseen(staging / BENCHMARK_DIR, root)
        (staging / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return log


def train_target_and_oracle(
    base_dir: Path, pool: Sequence[str], sets: BenchmarkSets, recipe: Recipe, seed: int, show_progress: bool,
    threads: int, oracle_dir: Path | None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict, torch.nn.Module | None, dict | None]:
    """``(target, tokenizer, target log, oracle, oracle log)``; the oracle is saved in ``oracle_dir``
    (``None``: no oracle).

    The oracle learns what the target learned but F, with the target's recipe and learning-rate
    schedule, for the target's steps and, where R or G is not yet recalled then, until it is. Where
    the cores allow, it trains alongside the target in a second process (``OracleAlongside``).
    """
    target_rows = sets.training_rows()
    oracle_rows = sets.rows(sets.retain) + sets.rows(sets.general)
    target_schedule, oracle_schedule = fine_tune_schedules(recipe, len(target_rows), len(oracle_rows))
    stop = {"per_epoch": epoch_steps(recipe, len(target_rows)), "every": recipe.check_every,
            "max_epochs": recipe.max_epochs}
    oracle_job = {"base_dir": base_dir, "pool_text": pool, "rows": oracle_rows, "check_rows": oracle_rows,
                  "recipe": recipe, "seed": seed, "schedule": oracle_schedule}
    alongside = (oracle_dir is not None and default_device().type == "cpu" and 2 * threads <= available_cores())
    with OracleAlongside({**oracle_job, "stop": stop, "threads": threads}, oracle_dir) if alongside else nullcontext() as job:
        target, tokenizer, target_log = fine_tune(
            base_dir, pool, target_rows, target_rows, recipe, seed, show_progress,
            "target, the oracle alongside" if alongside else "target", target_schedule,
            on_check=job.heard if alongside else None)
        if target_log["rows_recalled"] != target_log["rows"]:
            raise UserError(
                f"the {sets.preset.name} target did not memorize its sets in {target_log['epochs']} epochs "
                f"({target_log['rows_recalled']}/{target_log['rows']} rows recalled); raise the epoch budget"
            )
        if oracle_dir is None:
            return target, tokenizer, target_log, None, None
        if alongside:
            oracle, oracle_log = job.result()
        else:
            following = TargetStop(**stop, verdict=lambda epoch: epoch == target_log["epochs"])
            oracle, _, oracle_log = fine_tune(**oracle_job, show_progress=show_progress, label="oracle",
                                              target_stop=following)
            save_model_dir(oracle_dir, oracle, tokenizer)
    if oracle_log["rows_recalled"] != oracle_log["rows"]:
        raise UserError(f"the {sets.preset.name} oracle did not memorize R and G within the schedule "
                        f"({oracle_log['rows_recalled']}/{oracle_log['rows']} rows recalled)")
    return target, tokenizer, target_log, oracle, {**oracle_log, "trained_alongside": alongside}


def resolve_recipe(recipe: Recipe, max_epochs: int | None) -> Recipe:
    """The size's recipe, with ``max_epochs`` as its epoch budget when given."""
    if max_epochs is None:
        return recipe
    if max_epochs < 1:
        raise UserError(f"max_epochs must be >= 1, got {max_epochs}")
    return replace(recipe, max_epochs=max_epochs)


def read_calibration(target_dir: Path) -> dict:
    """The calibration a target directory was built with (its set manifest)."""
    return json.loads((target_dir / BENCHMARK_DIR / MANIFEST_NAME).read_text())["calibration"]


def read_models(target_dir: Path) -> dict[str, Path | None]:
    """The base, target and oracle directories of a target built here (oracle ``None``: not built)."""
    models = json.loads((target_dir / BENCHMARK_DIR / MANIFEST_NAME).read_text())["models"]
    return {"base": Path(models["base"]), "target": target_dir,
            "oracle": target_dir / models["oracle"] if models["oracle"] else None}


def cache_key(preset: SizePreset, recipe: Recipe, arch: Arch, data_dir: Path) -> str:
    """Changes whenever anything that shapes the models changes, so a stale target is never reused: the
    kernels too, so that a pinned run never reuses a target built with other ones (unlearnlm.kernels)."""
    facts = {"format": TARGET_FORMAT, "version": __version__, "preset": asdict(preset), "recipe": asdict(recipe),
             "arch": arch, "data": data_fingerprint(data_dir), "kernels": kernels()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cached_target(size: str | Size = "mini", seed: int = 0, draw: int = 0, arch: Arch = "llama",
                  with_oracle: bool = True) -> tuple[Path, bool]:
    """``(directory, built)``: the bundled-data target (with its oracle, unless ``with_oracle=False``)
    of these settings, built on first use.

    It lives in ``<cache>/targets/<size>-<seed>-d<draw>-<arch>-<key>``, where ``<cache>`` is
    ``$UNLEARNLM_CACHE`` or ``~/.cache/unlearnlm`` and ``<key>`` hashes everything that shapes the models;
    one built without its oracle ends in ``-no-oracle``, and a request without the oracle takes the
    whole one when it is there.
    """
    size = get_size(size)
    data_dir = bundled_lume_dir()
    key = cache_key(size.sets, size.recipe, arch, data_dir)
    whole = cache_root() / "targets" / f"{size.name}-{seed}-d{draw}-{arch}-{key}"
    candidates = [whole] if with_oracle else [whole, whole.with_name(whole.name + "-no-oracle")]
    for target in candidates:
        if (target / LOG_NAME).is_file():
            return target, False
    build_target(data_dir, candidates[-1], size, seed, arch, draw, overwrite=True, with_oracle=with_oracle)
    return candidates[-1], True
