"""``unlearn``, the recipe every unlearning follows: setup (read and check every input, load the model,
build the engine) -> train -> record -> save -> cleanup. The training loop itself is ``engine.py``.
"""

from __future__ import annotations

import json
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed

from unlearnlm import __version__
from unlearnlm.config import UnlearnConfig
from unlearnlm.data.raw import DEFAULT_TEXT_KEY, Rows, RowsInput, read_rows, refuse_shared_rows
from unlearnlm.distributed import build_accelerator, join_launched_processes
from unlearnlm.engine import Engine, RunSummary
from unlearnlm.errors import UserError
from unlearnlm.evaluation.evaluator import EvalData, quick_scores
from unlearnlm.evaluation.inputs import load_general_set, load_mia_documents
from unlearnlm.hub import LoadedModel, ModelSource, pin_adapter_base, resolve_model, weights_sha256
from unlearnlm.methods import get_method
from unlearnlm.model import apply_trainable, check_layer_choice, load_model_and_tokenizer, model_depth, save_model
from unlearnlm.modelcard import write_model_card
from unlearnlm.paths import claim_output, partial_dir_for, release_output, resolved_output
from unlearnlm.runstate import (
    check_output,
    check_resume_matches,
    finalize_output,
    is_finished,
    load_trainable_state,
    pause_for_test,
    prepare_output,
    run_identity,
    settle_failed_run,
    trainable_state,
)
from unlearnlm.tracking import accelerator_options, check_tracker, finish_trackers


@dataclass
class Unlearning:
    """What the steps of ``unlearn`` hand on to each other."""

    source: ModelSource | None  # the model read from disk or the Hub; None for one given loaded
    loaded: LoadedModel | None
    forget_rows: Rows
    retain_rows: Rows
    out_dir: Path
    work_dir: Path
    config: UnlearnConfig
    engine: Engine
    tokenizer: object
    redact: bool = False


def unlearn(
    model_path: str | Path | ModelSource | LoadedModel,
    forget_path: RowsInput,
    retain_path: RowsInput,
    out_dir: str | Path,
    config: UnlearnConfig,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    text_key: str = DEFAULT_TEXT_KEY,
    redact: bool = False,
) -> dict:
    """Unlearn ``forget`` from the model at ``model_path`` (a directory, an adapter, a Hub id, or a
    model already loaded) and write the result to ``out_dir``. The rows are SemEval rows or raw
    documents (``text_key``), as paths, Hub splits or in memory (see ``data.raw.read_rows``).

    A model on disk is only read; a loaded one is trained in place. The saved model gets a model card
    (``modelcard.py``; ``redact`` leaves out data file names and paths). Returns the ``run.json`` contents.
    """
    try:
        if resume and (finished := publish_finished(Path(out_dir), overwrite)) is not None:
            return finished  # the run had ended; only its publication failed
        job = setup(model_path, forget_path, retain_path, Path(out_dir), config, resume, overwrite, show_progress,
                    text_key, redact)
        summary = job.engine.run(resume=resume)
        finish_trackers(job.engine.accelerator)
        record = build_record(job, summary)
        save(job, record)
        cleanup(job)
    except BaseException as err:  # Ctrl-C too: what is kept, and how to go on, is part of the message
        kept = settle_failed_run(Path(out_dir), err)
        if kept:
            err.add_note(kept)
        raise
    finally:
        release_output(out_dir)
    return record


def setup(model_path: str | Path | ModelSource | LoadedModel, forget_path: RowsInput, retain_path: RowsInput,
          out_dir: Path, config: UnlearnConfig, resume: bool, overwrite: bool, show_progress: bool,
          text_key: str = DEFAULT_TEXT_KEY, redact: bool = False) -> Unlearning:
    """Read and check every input, load the model and make it trainable, then prepare the output.

    Nothing is written before every input has been read and checked.
    """
    loaded = model_path if isinstance(model_path, LoadedModel) else None
    source = None if loaded else resolve_model(model_path)
    if source is not None and source.is_adapter and config.save == "adapter":
        raise UserError(f"{source.spec} is an adapter: its unlearned version can only be saved merged (save=merged)")
    forget_rows = read_rows(forget_path, "forget", text_key)
    retain_rows = read_rows(retain_path, "retain", text_key, allow_empty=config.schedule.ratio == 0)
    refuse_shared_rows(forget_rows, retain_rows)
    forget, retain = forget_rows.for_training(), retain_rows.for_training()
    validation_data = load_validation_data(config, text_key) if config.validation.enabled else None
    check_tracker(config.tracking)
    accelerator = build_accelerator(**accelerator_options(config.tracking, out_dir))
    if loaded and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("under FSDP the model is read from disk: give its directory or Hub id, not a loaded model")
    plan = config.validation
    inputs = [*((source.path, source.tokenizer_dir) if source else ()),
              *(Path(p) for p in (forget_path, retain_path) if isinstance(p, (str, Path))),
              *(Path(p) for p in (plan.forget, plan.retain, plan.members, plan.nonmembers, plan.general) if p)]
    on_main_process(accelerator, check_output, out_dir, inputs, resume, overwrite)
    made_from = run_identity(config.to_dict(), (source or loaded).spec, forget_rows.sha256, retain_rows.sha256)
    if resume:
        on_main_process(accelerator, check_resume_matches, out_dir, made_from)
    if source is not None:
        check_layer_choice(source, config.layers)
        depth, method = model_depth(source), get_method(config.method)
        if depth is not None:  # the layers a method reads, checked before any weights load
            method.layers(method.build_settings(config.method_args), depth)
    model, tokenizer = (loaded.model, loaded.tokenizer) if loaded else load_model_and_tokenizer(source, config.dtype)
    set_seed(config.seed)  # LoRA initialisation draws random numbers
    model = apply_trainable(model, config.lora, config.layers)
    validator = build_validator(config, tokenizer, validation_data) if validation_data else None
    # Only now, with every input read and checked, is anything written.
    work_dir = on_main_process(accelerator, prepare_output, out_dir, inputs, resume, overwrite)
    engine = Engine(model, tokenizer, forget, retain, config, work_dir, validator, accelerator, show_progress,
                    made_from=made_from)
    return Unlearning(source, loaded, forget_rows, retain_rows, out_dir, work_dir, config, engine, tokenizer, redact)


def build_record(job: Unlearning, summary: RunSummary) -> dict:
    """The ``run.json`` record: what ran, on what, with which libraries, and how it ended."""
    engine, model, forget_rows, retain_rows = job.engine, job.source or job.loaded, job.forget_rows, job.retain_rows
    trainable, total = engine.parameter_counts()
    engine.accelerator.wait_for_everyone()
    return {
        "config": job.config.to_dict(),
        "model": model.spec,
        "model_source": model.record(),
        "data": {"forget": forget_rows.source, "forget_sha256": forget_rows.sha256, "forget_rows": len(forget_rows),
                 "retain": retain_rows.source, "retain_sha256": retain_rows.sha256, "retain_rows": len(retain_rows),
                 "raw_documents": forget_rows.is_raw},
        "seed": job.config.seed,
        "versions": library_versions(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": summary.steps,
        "phases": len(engine.phases),
        "world_size": engine.accelerator.num_processes,
        "distributed_type": engine.accelerator.distributed_type.value,
        "sharded_weights": engine.sharded,
        "wall_seconds": round(summary.seconds, 3),
        "validation_seconds": round(summary.validation_seconds, 3),
        "stopped_reason": summary.stopped_reason,
        "best": summary.best,
        **peak_memory_mb(),
    }


def save(job: Unlearning, record: dict) -> None:
    """The unlearned model, its model card and ``run.json``, written by the main process into the work
    directory (the main process's ``record`` gains the saved weights' hashes).

    Under FSDP no process holds the whole model: every process takes part in gathering the trainable
    weights, and the main one rebuilds the model from the input model and them (the frozen weights
    never changed).
    """
    engine, config, work_dir = job.engine, job.config, job.work_dir
    main = engine.accelerator.is_main_process
    trained = trainable_state(engine.unwrapped, keep=main) if engine.sharded else {}
    if main:
        final = rebuild_model(job.source, config, trained) if engine.sharded else engine.unwrapped
        save_model(final, job.tokenizer, work_dir, config.save)
        pause_for_test("saving")  # the kill tests stop here: weights written, run.json not yet
        if config.save == "adapter" and job.source is not None:
            pin_adapter_base(work_dir, job.source)
        record["output_weights_sha256"] = weights_sha256(work_dir)
        write_model_card(work_dir, record, job.redact)
        (work_dir / "run.json").write_text(json.dumps(record, indent=2))


def publish_finished(out_dir: Path, overwrite: bool) -> dict | None:
    """``--resume`` of a run that finished but was not moved to ``out_dir`` (a kill or an error after
    ``run.json`` was written): move it now and return its record; None when there is no such run."""
    if not join_launched_processes():  # before any Accelerator: the first shared state decides the process count
        return None
    claim_output(out_dir, overwrite)
    partial = partial_dir_for(resolved_output(out_dir))
    if not is_finished(partial):
        return None
    for name in ("state", "best"):
        shutil.rmtree(partial / name, ignore_errors=True)
    finalize_output(partial, out_dir)
    return json.loads((Path(out_dir) / "run.json").read_text())


def cleanup(job: Unlearning) -> None:
    """Drop the resume state and move the work directory to its place; then every process goes on."""
    if job.engine.accelerator.is_main_process:
        for name in ("state", "best", "origin"):
            if (job.work_dir / name).exists():
                shutil.rmtree(job.work_dir / name)
        finalize_output(job.work_dir, job.out_dir)
    job.engine.accelerator.wait_for_everyone()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process and, on a GPU, peak allocated device memory."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peaks["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def rebuild_model(model_path: str | Path | ModelSource, config: UnlearnConfig,
                  trainable: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The input model, on the CPU, with the trainable weights of a run put in."""

    model, _ = load_model_and_tokenizer(model_path, config.dtype)
    model = apply_trainable(model, config.lora, config.layers)
    load_trainable_state(model, trainable)
    return model


def on_main_process(accelerator: Accelerator, function: Callable, *args):
    """Run ``function`` on the main process only and give its result, or its UserError, to every process.

    For changes to the output directory, which processes sharing a filesystem must not race on.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = function(*args)
        except UserError as err:
            error = str(err)
    result, error = broadcast_object_list([result, error])
    if error is not None:
        raise UserError(error)
    return result


def library_versions() -> dict[str, str]:
    # From the installed metadata: importing peft only for its version costs seconds per job.
    return {"unlearnlm": __version__, "torch": torch.__version__,
            **{name: version(name) for name in ("transformers", "peft", "accelerate")}}


def load_validation_data(config: UnlearnConfig, text_key: str = DEFAULT_TEXT_KEY):
    """The held-out sets of checkpoint selection, read and checked before any model loads."""
    plan = config.validation
    return EvalData(read_rows(plan.forget, "forget", text_key).for_evaluation(),
                    read_rows(plan.retain, "retain", text_key).for_evaluation(),
                    load_mia_documents(plan.members, "members", text_key) if plan.members else None,
                    load_mia_documents(plan.nonmembers, "nonmembers", text_key) if plan.nonmembers else None,
                    load_general_set(plan.general) if plan.general else None)


def build_validator(config: UnlearnConfig, tokenizer, data) -> Callable[[torch.nn.Module], dict]:
    """Checkpoint selection: the SemEval scores of held-out sets (``load_validation_data``), in the
    evaluator's fast mode; their token cache tokenizes them once for every validation."""
    plan = config.validation

    def validate(model: torch.nn.Module) -> dict:
        return quick_scores(model, tokenizer, data.forget, data.retain, data.members, data.nonmembers, data.general,
                            batch_size=plan.batch_size, max_new_tokens=plan.max_new_tokens, cache=data.cache)

    return validate
