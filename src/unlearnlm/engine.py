"""The one training loop every method runs on, built on accelerate.

One model, one optimizer and one scheduler live for the whole run; chunks are phases of the data
schedule, not new trainers. The optimizer state can be reset per chunk (as the SUGD authors did)
without rebuilding anything. ``recipe.py`` builds the engine from the inputs and writes its result.
"""

from __future__ import annotations

import enum
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.distributed.fsdp import FSDPModule

from unlearnlm.config import UnlearnConfig
from unlearnlm.data.raw import DOCUMENT_TASK
from unlearnlm.data.records import Record, whole_document
from unlearnlm.data.schedule import FORGET, RETAIN, Item, Phase, lr_factors, optimizer_steps
from unlearnlm.data.tokenize import Example, collate, encode_example
from unlearnlm.data.windows import window_examples
from unlearnlm.distributed import build_accelerator, in_lockstep
from unlearnlm.errors import UserError
from unlearnlm.evaluation.metrics import metric_selection
from unlearnlm.methods import get_method
from unlearnlm.methods.base import Batch, forward, model_inputs
from unlearnlm.model import count_parameters, model_context
from unlearnlm.reference import ReferenceValues
from unlearnlm.runstate import (
    is_sharded,
    load_checkpoint,
    load_trainable,
    optimizer_state,
    process_rng_state,
    save_checkpoint,
    save_trainable,
    trainable_state,
)
from unlearnlm.tracking import brief, global_means, hyperparameters, scalars, stat_rows


class Stop(enum.Enum):
    """Why a run ended. ``run.json`` keeps the sentence ``stopped_reason`` gives, unchanged."""

    COMPLETED = "completed"
    DIVERGED = "diverged"
    MAX_STEPS = "max_steps"
    TIME_BUDGET = "time_budget"
    SELECTED = "selected"  # the validation scores met the selection's stopping rule


@dataclass
class RunSummary:
    steps: int = 0
    seconds: float = 0.0
    validation_seconds: float = 0.0  # part of ``seconds``
    stop: Stop = Stop.COMPLETED
    stopped_reason: str = "completed"  # ``stop`` in words, with its details
    best: Optional[dict] = None
    validations: list[dict] = field(default_factory=list)


def example_row(example: Example) -> int:
    """The index of the row an example was encoded from: its key is the role's initial and that index
    (``f12``), with the window's number for a long raw document's windows (``f12w3``; ``Engine._encode``)."""
    return int(example.meta["key"][1:].partition("w")[0])


class Engine:
    """Runs a method's schedule on a model. Build it once; ``run`` resumes from ``state/`` if asked."""

    def __init__(self, model: torch.nn.Module, tokenizer, forget: list[Record], retain: list[Record],
                 config: UnlearnConfig, work_dir: Path, validator: Optional[Callable[[torch.nn.Module], dict]] = None,
                 accelerator: Optional[Accelerator] = None, show_progress: bool = True, made_from: Optional[dict] = None):
        self.config = config
        self.made_from = made_from or {}  # what the run is made from (runstate.run_identity), kept in checkpoints
        self.method = get_method(config.method)
        self.settings = self.method.build_settings(config.method_args)
        self.layers = self.method.layers(self.settings, model.config.num_hidden_layers)
        self.accelerator = accelerator or build_accelerator()
        self.tokenizer = tokenizer
        self.work_dir = work_dir
        self.validator = validator
        self.selection = metric_selection(config.validation.metric)
        # Called with each phase and the validations before it, when the phase starts (on resume too):
        # the phase to train instead, with as many items (auto's settling passes share out their steps).
        self.arrange_phase: Optional[Callable[[Phase, list[dict]], Phase]] = None
        self.show_progress = show_progress and self.accelerator.is_main_process
        set_seed(config.seed)
        if config.forget_whole_documents:
            forget = [whole_document(row) for row in forget]
        self.rows = {FORGET: forget, RETAIN: retain}
        context = model_context(model)
        self.examples = {FORGET: self._encode(forget, "f", context), RETAIN: self._encode(retain, "r", context)}
        self.phases = self.method.schedule(len(self.examples[FORGET]), len(self.examples[RETAIN]), config,
                                           self.settings, config.seed)
        optimizer = self._optimizer(model)
        self.steps_per_epoch = [optimizer_steps(len(p.items), self._global_batch(p), config.optim.grad_accum)
                                for p in self.phases]
        self.scheduler = self._scheduler(optimizer)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.sharded = is_sharded(self.model)  # FSDP: each process holds a shard of every weight
        self.references = ReferenceValues(self.method, self.layers, self.accelerator.device)
        self.log_path = work_dir / "unlearn_log.jsonl"
        if self.accelerator.log_with:
            self.accelerator.init_trackers(config.tracking.project, config=hyperparameters(config.to_dict()))

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The schedule of ``optim.lr``. It is stepped by us once per optimizer update and never handed
        to accelerate, which would step it once per process."""
        config = self.config
        self.factors = lr_factors(self.phases, self.steps_per_epoch, config.optim.warmup_steps,
                                  config.optim.optimizer_reset == "per_chunk", config.optim.lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factors[min(step, len(self.factors) - 1)])

    # --- training from the start again at another rate (auto's rate probe) -----------------------

    def restart(self, lr: float) -> None:
        """Forget the optimizer's state and the schedule's position, and train at ``lr`` from now on."""
        self.config.optim.lr = lr
        optimizer = self.optimizer.optimizer
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr
        self.scheduler = self._scheduler(optimizer)
        set_seed(self.config.seed)

    def add_phase(self, phase: Phase) -> None:
        """One more phase after the method's schedule (call ``restart`` after it for its schedule of rates)."""
        self.phases.append(phase)
        self.steps_per_epoch.append(optimizer_steps(len(phase.items), self._global_batch(phase), self.config.optim.grad_accum))

    def add_forget_rows(self, rows: list[Record]) -> range:
        """Forget rows outside the method's schedule, for a phase added after it (auto's settling pass
        over earlier requests); returns their indices."""
        rows = [whole_document(row) for row in rows] if self.config.forget_whole_documents else rows
        start, first_row = len(self.examples[FORGET]), len(self.rows[FORGET])
        self.rows[FORGET] = self.rows[FORGET] + rows
        self.examples[FORGET] += self._encode(rows, "f", model_context(self.unwrapped), first_row)
        return range(start, len(self.examples[FORGET]))

    def train_phase(self, phase_index: int) -> None:
        """Train one phase of the schedule, logging nothing to the run's log (a probe, not the run)."""
        self.model.train()
        self._run_phase(phase_index, RunSummary(), time.perf_counter(), 0.0, log=False)

    def save_origin(self) -> None:
        """Keep the trainable weights as they are now, to come back to with ``restore_origin``."""
        origin = trainable_state(self.unwrapped, keep=self.accelerator.is_main_process)
        if self.accelerator.is_main_process:
            save_trainable(origin, self.work_dir / "origin")
        self.accelerator.wait_for_everyone()

    def restore_origin(self) -> None:
        load_trainable(self.unwrapped, self.work_dir / "origin")
        self.accelerator.wait_for_everyone()

    def _encode(self, rows: list[Record], prefix: str, context: Optional[int], first: int = 0) -> list[Example]:
        """The training rows; each keeps its key (role initial and index) for the reference cache.

        A raw document longer than the context (or ``max_length``) becomes one row per window, each
        trained on the tokens it alone scores (data/windows.py); any other row longer than the
        model's context is refused unless ``max_length`` says where to cut it."""
        config = self.config
        examples = []
        for index, row in enumerate(rows, start=first):
            if row.task == DOCUMENT_TASK:
                whole = encode_example(self.tokenizer, row.input, row.output, append_eos=config.append_eos)
                limits = [limit for limit in (config.max_length, context) if limit]
                parts = window_examples(whole, min(limits, default=len(whole.input_ids)))
                examples += [replace(part, meta={"key": f"{prefix}{index}w{number}"}) for number, part in enumerate(parts)]
                continue
            example = encode_example(self.tokenizer, row.input, row.output, config.max_length,
                                     append_eos=config.append_eos, key=f"{prefix}{index}")
            if config.max_length is None and context and len(example.input_ids) > context:
                raise UserError(f"row {row.id!r} has {len(example.input_ids)} tokens, more than the model's context of "
                                f"{context}; set max_length (--set max_length={context}) to train on its last {context}")
            examples.append(example)
        return examples

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable weights (gradient checkpointing switched on first, when asked)."""
        if self.config.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters")
        return torch.optim.AdamW(params, lr=self.config.optim.lr, weight_decay=self.config.optim.weight_decay)

    # --- reference model without a second copy ------------------------------------------------------

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _reference_values(self, batch: Batch) -> Optional[list[torch.Tensor]]:
        return self.references.read(self.unwrapped, batch)

    def _fill_reference_cache(self) -> None:
        """Without LoRA, the original model's values, computed once, before any weight moves."""
        needed = {(item.role, item.index) for phase in self.phases for item in phase.items
                  if item.role in self.method.reference_roles}
        self.references.fill(self.model, self.unwrapped, [self.examples[role][index] for role, index in sorted(needed)],
                             self._collate)

    # --- batches ---------------------------------------------------------------------------------

    def _collate(self, examples: list[Example], weight: float = 1.0) -> Batch:
        padded = collate(examples, self.tokenizer.pad_token_id)
        batch: Batch = {name: tensor.to(self.accelerator.device) for name, tensor in padded.items()}
        batch["is_forget"] = torch.tensor([e.meta["key"].startswith("f") for e in examples], device=self.accelerator.device)
        batch["keys"] = [e.meta["key"] for e in examples]
        batch["share"] = weight
        return batch

    _model_inputs = staticmethod(model_inputs)

    def _global_batch(self, phase: Phase) -> int:
        per_process = phase.batch_size if phase.batch_size is not None else self.config.optim.batch_size
        return per_process * self.accelerator.num_processes

    def _local_batches(self, items: list[Item], global_batch: int) -> list[Batch]:
        """Cut the phase into global batches; this process takes its share of each one.

        Each share is weighted by its size so that averaging gradients over processes gives the
        mean over the whole global batch, exactly as one process would compute it.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        batches = []
        for start in range(0, len(items), global_batch):
            global_items = items[start:start + global_batch]
            mine = global_items[rank::world]
            share = len(mine) * world / len(global_items)
            if not mine:
                # Nothing left for this rank: run a zero-weight example so collective ops still match.
                mine, share = global_items[:1], 0.0
            batches.append(self._collate([self.examples[item.role][item.index] for item in mine], share))
        return batches

    def _phase_items(self, phase_index: int, epoch: int) -> list[Item]:
        phase = self.phases[phase_index]
        shuffle = phase.shuffle if phase.shuffle is not None else self.config.schedule.shuffle_within_chunk
        if not shuffle:
            return phase.items
        items = phase.items
        order = list(items)
        random.Random(f"{self.config.seed}-{phase_index}-{epoch}").shuffle(order)
        return order

    # --- the loop --------------------------------------------------------------------------------

    def run(self, resume: bool = False, until: Optional[int] = None) -> RunSummary:
        """Train the schedule, or its phases before ``until`` and return as if interrupted there (the
        checkpoint written, the best state not loaded): ``run(resume=True)`` goes on from it."""
        summary = RunSummary()
        start_phase, elapsed_before = 0, 0.0
        state_dir = self.work_dir / "state"
        # Before any checkpoint is loaded: the reference is the input model, also on resume.
        self._fill_reference_cache()
        if resume:
            position = self._load_checkpoint(state_dir)
            start_phase, summary.steps, elapsed_before = position["next_phase"], position["steps"], position["seconds"]
            summary.best, summary.validations = position.get("best"), position.get("validations", [])
            summary.validation_seconds = position.get("validation_seconds", 0.0)
            summary.stop = Stop(position.get("stop", Stop.COMPLETED.value))
            summary.stopped_reason = position.get("stopped_reason", summary.stop.value)
            if summary.stop is not Stop.COMPLETED:  # it stopped at a limit: nothing is left to train
                start_phase = len(self.phases)
            self._truncate_log(position["log_bytes"])
        else:
            if self.accelerator.is_main_process:
                self.log_path.write_text("")
            self._checkpoint(state_dir, 0, summary, elapsed_before)
        started = time.perf_counter()
        self.model.train()
        for phase_index in range(start_phase, len(self.phases) if until is None else min(until, len(self.phases))):
            if self.arrange_phase is not None:
                self.phases[phase_index] = self.arrange_phase(self.phases[phase_index], summary.validations)
            phase = self.phases[phase_index]
            if self.config.optim.optimizer_reset == "per_chunk" and phase_index > 0:
                self.optimizer.state.clear()
            stop = self._run_phase(phase_index, summary, started, elapsed_before)
            if stop is Stop.DIVERGED:
                self._load_checkpoint(state_dir)
                break
            if self.validator is not None and self._validate(phase, summary) and not stop:
                stop = summary.stop = Stop.SELECTED
                summary.stopped_reason = f"stopped after {phase.name}: {self.selection.stop_reason}"
            self._checkpoint(state_dir, phase_index + 1, summary, elapsed_before + time.perf_counter() - started)
            if stop:
                break
        summary.seconds = elapsed_before + time.perf_counter() - started
        if summary.best is not None and until is None:
            load_trainable(self.unwrapped, self.work_dir / "best")
        return summary

    def _run_phase(self, phase_index: int, summary: RunSummary, started: float, elapsed_before: float,
                   log: bool = True) -> Optional[Stop]:
        phase, accum, limits = self.phases[phase_index], self.config.optim.grad_accum, self.config.optim
        total = self.steps_per_epoch[phase_index] * phase.epochs
        progress = _progress(self.show_progress)
        with progress:
            task = progress.add_task(phase.name, total=total)
            for epoch in range(phase.epochs):
                batches = self._local_batches(self._phase_items(phase_index, epoch), self._global_batch(phase))
                for group_start in range(0, len(batches), accum):
                    group = batches[group_start:group_start + accum]
                    stats = self._optimizer_step(group)
                    summary.steps += 1
                    row = {"phase": phase.name, "chunk": phase.chunk + 1, "epoch": epoch + 1, "step": summary.steps,
                           **stats, "lr": self.scheduler.get_last_lr()[0],
                           "seconds": round(elapsed_before + time.perf_counter() - started, 3)}
                    if log:
                        self._log(row)
                    progress.update(task, advance=1, description=f"{phase.name} e{epoch + 1} " + brief(stats))
                    reason = self._divergence(stats)
                    if reason:
                        summary.stop = Stop.DIVERGED
                        summary.stopped_reason = f"diverged at step {summary.steps}: {reason}; kept the state before {phase.name}"
                        self._log({"event": "diverged", "step": summary.steps, "reason": reason})
                        return summary.stop
                    if limits.max_steps is not None and summary.steps >= limits.max_steps:
                        summary.stop = Stop.MAX_STEPS
                        summary.stopped_reason = f"max_steps={limits.max_steps} reached"
                        return summary.stop
                    elapsed = elapsed_before + time.perf_counter() - started
                    if limits.time_budget_s is not None and self._on_any_process(elapsed >= limits.time_budget_s):
                        summary.stop = Stop.TIME_BUDGET
                        summary.stopped_reason = f"time budget of {limits.time_budget_s}s reached"
                        return summary.stop
                    every = self.config.validation.every_steps
                    if self.validator is not None and every and summary.steps % every == 0 and self._validate(phase, summary):
                        summary.stop = Stop.SELECTED
                        summary.stopped_reason = f"stopped at step {summary.steps}: {self.selection.stop_reason}"
                        return summary.stop
        return None

    def _optimizer_step(self, group: list[Batch]) -> dict:
        sums: dict[str, list[float]] = {}  # name -> [weighted sum, weight] over this process's rows
        for position, batch in enumerate(group):
            last = position == len(group) - 1
            context = self.accelerator.no_sync(self.model) if not last else nullcontext()
            with context:
                logits = forward(self.model, batch, self.layers)
                loss, stats = self.method.loss(logits, batch, self.settings, self._reference_values(batch))
                self.accelerator.backward(loss * batch["share"] / len(group))
            # The hidden states are spent: drop them before the next micro-batch's forward.
            batch.pop("hidden", None)
            batch.pop("reference_hidden", None)
            for name, value in {"loss": loss.item(), **stats}.items():
                weight = stat_rows(name, batch)
                if weight:
                    total = sums.setdefault(name, [0.0, 0.0])
                    total[0] += value * weight
                    total[1] += weight
        if self.config.optim.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_means(sums)

    def _on_any_process(self, flag: bool) -> bool:
        """True on every process when it is true on one, so that all processes stop at the same step."""
        flags = torch.tensor(int(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flags, reduction="max").item())

    def _divergence(self, stats: dict) -> Optional[str]:
        if not all(math.isfinite(value) for value in stats.values()):
            return "non-finite loss"
        bound = self.config.guard.max_forget_loss
        if bound is not None and stats.get("forget_loss", 0.0) > bound:
            return f"forget loss {stats['forget_loss']:.2f} above max_forget_loss={bound}"
        return None

    def _validate(self, phase: Phase, summary: RunSummary) -> bool:
        """Score the model, keep its state when it is the best so far; True when the selection says stop."""
        started = time.perf_counter()
        self.model.eval()
        # Every process runs the validator (it may share out the rows); the main process's scores decide.
        with self.evaluation_view():
            scores = broadcast_object_list([self.validator(self.unwrapped)])[0]
        self.model.train()
        record = {"event": "validation", "phase": phase.name, "chunk": phase.chunk + 1, "step": summary.steps, **scores}
        summary.validations.append(record)
        self._log(record)
        if self.config.validation.select and (summary.best is None or self.selection.better(scores, summary.best)):
            summary.best = record
            best = trainable_state(self.unwrapped, keep=self.accelerator.is_main_process)
            if self.accelerator.is_main_process:
                save_trainable(best, self.work_dir / "best")
            self.accelerator.wait_for_everyone()
        summary.validation_seconds += time.perf_counter() - started
        return self.selection.done(scores)

    @contextmanager
    def evaluation_view(self) -> Iterator[None]:
        """Under FSDP: every process evaluates every row, in step, with the root module's own weights
        (embeddings, final norm, head) gathered throughout. peft's ``generate`` calls the inner
        model's forward, which skips the root's hook that would gather them."""
        if not self.sharded:
            yield
            return
        self.unwrapped.unshard()
        try:
            with in_lockstep():
                yield
        finally:
            # Every sharded module, not the root alone: a module that forwarded with no backward after it
            # stays whole (the embedding and final norm did, on the micro target), and the optimizer's
            # sharded weights would then no longer be the model's.
            for module in self.unwrapped.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def _checkpoint(self, state_dir: Path, next_phase: int, summary: RunSummary, seconds: float) -> None:
        main = self.accelerator.is_main_process
        trainable = trainable_state(self.unwrapped, keep=main)
        optimizer = optimizer_state(self.unwrapped, self.optimizer.optimizer, keep=main)
        # Each process's random state is kept, so that a resumed run draws what it would have drawn.
        rng_states = gather_object([process_rng_state()])
        if main:
            # The stop state too: a run that stopped at max_steps or its time budget resumes to that stop,
            # not into the next chunk; and what the run was made from, which --resume must match.
            position = {"next_phase": next_phase, "steps": summary.steps, "seconds": seconds, "best": summary.best,
                        "validations": summary.validations, "validation_seconds": summary.validation_seconds,
                        "log_bytes": self.log_path.stat().st_size, "stop": summary.stop.value,
                        "stopped_reason": summary.stopped_reason, "world_size": self.accelerator.num_processes,
                        "made_from": self.made_from}
            save_checkpoint(state_dir, trainable, optimizer, self.scheduler.state_dict(), position, rng_states)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, state_dir: Path) -> dict:
        return load_checkpoint(state_dir, self.unwrapped, self.optimizer.optimizer, self.scheduler,
                               self.accelerator.process_index, self.accelerator.num_processes)

    def _log(self, row: dict) -> None:
        if self.accelerator.is_main_process:
            with self.log_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log(scalars(row), step=row["step"])

    def _truncate_log(self, size: int) -> None:
        if self.accelerator.is_main_process:
            with self.log_path.open("r+b") as handle:
                handle.truncate(size)

    def parameter_counts(self) -> tuple[int, int]:
        return count_parameters(self.unwrapped)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)
