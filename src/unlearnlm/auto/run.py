"""``unlearn --unseen U --config auto``: the whole procedure, from M, F, R and U alone.

1. Read U, refuse it if it shares text with F or R, split it (``unseen``).
2. On the original model: the level (mean loss per token on U's level part), the retain answers'
   loss and score, and how much of the held-out unseen documents the model regurgitates; these fix
   the check's bounds (``check.make_bounds``).
3. The rate probe on the first chunk (``rate``), each probe from the original weights; or the rate
   given (``auto.rate``: a ledger passes on the rate its first request probed). A probed rate is
   confirmed by the run's first two chunks (``calibrated_run``): the run goes on from them while the
   retain loss after them is within its bound, and starts again at half the rate otherwise.
4. The run at that rate, each forget row held at the level from both sides (``forget_target``), with
   the held-out check after every chunk: the level is read again from U's level part (the model's
   loss on unseen text drifts as it changes, and a forgotten document should read like unseen text
   now, not before), the run stops when the check is met, and the best state by the check is kept.
   After the chunks, settling passes over all of F at once with retain rows (``settle``), each
   checked, until one meets the check (at most ``auto.settle_passes``), bring back to the level the
   documents of early chunks, which later chunks' training moved, and the next pass pulls back what
   one pushed past it, each document getting forget steps in proportion to its distance from the
   level at the check before; they also cover the forget sets unlearned before from this model
   (``forgotten_before``: a ledger's earlier requests), which this run's training moves as well.
5. The check on the state kept, stages 1 and 2, gives ``run.json``'s verdict. The earlier forget sets
   are in every check with F (never in the probe or the level), so the verdict covers them too.

Nothing else is read: no evaluation set, no oracle, no grid.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unlearnlm.auto import check as held_out
from unlearnlm.auto.measure import (
    CheckData,
    answer_losses,
    answer_scores,
    check_data,
    document_losses,
    mean,
    whole_documents,
)
from unlearnlm.auto.rate import Probe, RateChoice, choose_rate, next_rate
from unlearnlm.auto.settle import arrange, document_examples, settle_phases
from unlearnlm.auto.unseen import read_unseen, refuse_overlap, split_unseen
from unlearnlm.config import UnlearnConfig, refuse_validation_with_auto
from unlearnlm.data.raw import DEFAULT_TEXT_KEY, Rows, RowsInput, read_rows
from unlearnlm.data.records import Record
from unlearnlm.data.schedule import FORGET, Phase
from unlearnlm.engine import Engine, RunSummary, Stop, example_row
from unlearnlm.errors import UserError
from unlearnlm.evaluation.metrics import Selection
from unlearnlm.paths import write_aside
from unlearnlm.recipe import build_record, cleanup, save, setup
from unlearnlm.runstate import discard_checkpoint
from unlearnlm.tracking import finish_trackers

CALIBRATION_FILE = "auto.json"  # in the work directory: a resumed run does not probe again
CONFIRM_CHUNKS = 2  # the run's first chunks that confirm the rate
BATCH_SIZE = 16
# Documents are hundreds of tokens long: in batches of 8, length-sorted, a check's documents were read in
# 1.45 s against 1.8 s in batches of 16 on the bench target (2 CPU cores; less padding per batch).
DOCUMENT_BATCH_SIZE = 8


class Calibration:
    """The check's data and bounds on one engine, and the functions the engine calls."""

    def __init__(self, engine: Engine, tokenizer, data: CheckData):
        self.engine, self.tokenizer, self.data = engine, tokenizer, data
        self.bounds: held_out.Bounds | None = None
        self.before: dict = {}
        self.retain_terms_before: dict[str, float] = {}

    # --- what the check reads ------------------------------------------------------------------

    def _model(self):
        return self.engine.unwrapped

    def level(self, model) -> float:
        return mean(document_losses(model, self.tokenizer, self.data.level_documents, self.data.cache,
                                    DOCUMENT_BATCH_SIZE))

    def retain_loss(self, model) -> float:
        config = self.engine.config
        return mean(answer_losses(model, self.tokenizer, self.data.retain_training, BATCH_SIZE, config.max_length,
                                  config.append_eos))

    def measure_before(self) -> dict:
        """The original model's numbers, which fix the bounds."""
        settings, model = self.engine.config.auto, self._model()
        with self.engine.evaluation_view():
            level, retain_loss = self.level(model), self.retain_loss(model)
            retain_scores = answer_scores(model, self.tokenizer, self.data.retain_rows, self.data.cache, BATCH_SIZE)
            unseen_regurgitated = mean(answer_scores(model, self.tokenizer, self.data.unseen_rows, self.data.cache, BATCH_SIZE))
        self.before = {"level": level, "retain_loss": retain_loss, "retain_score": mean(retain_scores),
                       "unseen_regurgitated": unseen_regurgitated}
        self.retain_terms_before = held_out.term_means(retain_scores, self.data.retain_terms)
        self.bounds = held_out.make_bounds(len(self.data.forget_documents), len(self.data.check_documents), retain_loss,
                                           level, unseen_regurgitated, settings.retain_tolerance,
                                           settings.regurgitation_margin, settings.retain_kept,
                                           {name: len(indices) for name, indices in self.data.groups.items()})
        return self.before

    def check(self, model, answers: bool = False) -> dict:
        """The held-out check; stage 2 (generations) when stage 1 passes or ``answers``. It also moves
        the forget ceiling to the level read now, on every process alike (the losses are gathered)."""
        data = self.data
        # One pass over the three sets: length-sorted together, their batches are padded less.
        parts = (data.level_documents, data.forget_documents, data.check_documents)
        losses = document_losses(model, self.tokenizer, [text for part in parts for text in part], data.cache,
                                 DOCUMENT_BATCH_SIZE)
        ends = np.cumsum([len(part) for part in parts])
        level = mean(losses[:ends[0]])
        forget_losses, unseen_losses = losses[ends[0]:ends[1]], losses[ends[1]:]
        figures = held_out.loss_figures(forget_losses, unseen_losses, self.retain_loss(model), level)
        figures["document_losses"] = [float(loss) for loss in forget_losses]  # what the next settling pass shares out
        if data.groups:
            figures["group_mia_auc"] = held_out.group_aucs(forget_losses, unseen_losses, data.groups)
        if answers or held_out.loss_stage_met(figures, self.bounds):
            forget_scores = answer_scores(model, self.tokenizer, data.forget_rows, data.cache, BATCH_SIZE)
            figures.update(held_out.answer_figures(
                forget_scores, answer_scores(model, self.tokenizer, data.retain_rows, data.cache, BATCH_SIZE),
                data.retain_terms, self.retain_terms_before))
            if data.has_earlier:
                figures["request_regurgitated"] = mean(forget_scores[:data.own_rows])
        hold(self.engine, level)
        return figures

    # --- the probe -------------------------------------------------------------------------------

    def probe(self, lr: float) -> Probe:
        """The first chunk trained at ``lr`` from the original weights, its forget rows pushed up to the
        level (one-sided ceiling); its forget rows and the retain rows read, the weights put back."""
        engine = self.engine
        engine.settings.forget_target, engine.settings.forget_ceiling = None, self.before["level"]
        started = time.perf_counter()
        engine.restart(lr)
        engine.train_phase(0)
        with engine.evaluation_view():
            forget_loss, retain_loss = self.chunk_loss(0), self.retain_loss(self._model())
        engine.restore_origin()
        return Probe(lr, forget_loss, retain_loss, time.perf_counter() - started)

    def chunk_loss(self, phase: int) -> float:
        """The mean answer loss of a chunk's forget rows."""
        config = self.engine.config
        return mean(answer_losses(self._model(), self.tokenizer, trained_rows(self.engine, phase), BATCH_SIZE,
                                  config.max_length, config.append_eos))

    def choose_rate(self) -> RateChoice:
        return choose_rate(self.probe, self.before["level"], self.bounds.retain_loss)

    def selection(self) -> Selection:
        bounds = self.bounds
        return Selection(better=lambda new, old: held_out.rank(new, bounds) > held_out.rank(old, bounds),
                         done=lambda scores: held_out.met(scores, bounds),
                         stop_reason="the held-out check was met")


def trained_rows(engine: Engine, phase: int) -> list[Record]:
    """The forget rows a chunk trains, once each. A schedule's items index examples, and a raw document
    longer than the context is several examples (its windows), each of its row (``example_row``)."""
    examples = engine.examples[FORGET]
    rows = dict.fromkeys(example_row(examples[item.index]) for item in engine.phases[phase].items if item.role == FORGET)
    return [engine.rows[FORGET][index] for index in rows]


def hold(engine: Engine, level: float) -> None:
    """Hold every forget row at ``level`` from both sides: pushed up to it, pulled back past it. The
    one-sided ceiling let the demo target's last chunk overshoot unseen text (members at 5.1 to 7.6
    nats against nonmembers near 4), which the loss attack reads as plainly as memorised text."""
    engine.settings.forget_ceiling, engine.settings.forget_target = None, level


def read_inputs(forget: RowsInput, retain: RowsInput, unseen: RowsInput, text_key: str,
                earlier: Sequence[RowsInput] = ()) -> tuple[list[str], list[Rows]]:
    """U, checked against F, R and the earlier forget sets before any model loads; and those sets."""
    documents = read_unseen(unseen, text_key)
    earlier_rows = [read_rows(value, "forget", text_key) for value in earlier]
    refuse_overlap(documents, read_rows(forget, "forget", text_key), read_rows(retain, "retain", text_key), earlier_rows)
    return documents, earlier_rows


def calibrated_run(calibration: Calibration, work_dir: Path, resume: bool, settle: list[Phase]) -> tuple[RunSummary, dict]:
    """The rate (given as ``auto.rate``, or probed), then the run, whose first ``CONFIRM_CHUNKS`` chunks
    confirm it: while the retain loss after them breaks its bound, the weights go back to the original
    ones and the run starts again at half the rate (``rate.next_rate``). What was decided is kept in
    ``auto.json`` as it is decided, so that a resumed run goes on where it stopped, probes included."""
    engine, saved = calibration.engine, work_dir / CALIBRATION_FILE
    state = json.loads(saved.read_text()) if resume and saved.is_file() else None
    if state is None:  # nothing decided before an interruption: start from the original weights
        resume = False
        engine.save_origin()
        given = engine.config.auto.rate
        choice = calibration.choose_rate() if given is None else None
        state = {"lr": given if given is not None else choice.lr, "source": "given" if choice is None else "probed",
                 "probes": listed(choice.probes) if choice else [], "reached": choice.reached if choice else None,
                 "retain_ok": choice.retain_ok if choice else None, "confirmations": [],
                 "confirmed": choice is None or len(engine.phases) < CONFIRM_CHUNKS}
    for phase in settle:
        engine.add_phase(phase)
    state_dir = work_dir / "state"
    while True:
        write_state(engine, saved, state)
        resume = resume and (state_dir / "position.json").is_file()  # killed before this start's first checkpoint
        engine.restart(state["lr"])
        hold(engine, (resumed_level(work_dir) if resume else None) or calibration.before["level"])
        if state["confirmed"]:
            return engine.run(resume=resume), state
        started = time.perf_counter()
        summary = engine.run(resume=resume, until=CONFIRM_CHUNKS)
        lower = judged_start(state, summary, calibration.bounds.retain_loss, time.perf_counter() - started)
        if lower is None:  # kept: the run goes on from its checkpoint after these chunks
            state["confirmed"], resume = True, True
        else:
            engine.restore_origin()
            if engine.accelerator.is_main_process:
                discard_checkpoint(state_dir)
            engine.accelerator.wait_for_everyone()
            state["lr"], resume = lower, False


def judged_start(state: dict, summary: RunSummary, retain_bound: float, seconds: float) -> float | None:
    """Record a start of the run (its first chunks) in ``state``; the rate to start again at, or None to
    go on. A start that met the check, or reached max_steps or the time budget, is kept; one that
    diverged (its retain loss counted as infinite) starts again at half the rate, as one that damaged
    R does."""
    diverged = summary.stop is Stop.DIVERGED
    state["confirmations"].append({"lr": state["lr"], "seconds": round(seconds, 2),
                                   "retain_loss": None if diverged else round(summary.validations[-1]["retain_loss"], 4)})
    if summary.stop not in (Stop.COMPLETED, Stop.DIVERGED):
        return None
    losses = [math.inf if entry["retain_loss"] is None else entry["retain_loss"] for entry in state["confirmations"]]
    return next_rate(losses, retain_bound, state["lr"])


def write_state(engine: Engine, path: Path, state: dict) -> None:
    if engine.accelerator.is_main_process:
        write_aside(path, json.dumps(state))
    engine.accelerator.wait_for_everyone()


def unlearn_auto(model, forget: RowsInput, retain: RowsInput, unseen: RowsInput, out: str | Path,
                 config: UnlearnConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True,
                 text_key: str = DEFAULT_TEXT_KEY, redact: bool = False,
                 forgotten_before: Sequence[RowsInput] = ()) -> dict:
    """Calibrate, unlearn and judge; returns ``run.json`` with its ``verdict``. ``forgotten_before``:
    forget sets unlearned before from this model, settled and checked with F."""
    refuse_validation_with_auto(config)
    documents, earlier = read_inputs(forget, retain, unseen, text_key, forgotten_before)
    split = split_unseen(documents, config.seed)
    job = setup(model, forget, retain, Path(out), config, resume, overwrite, show_progress, text_key, redact)
    engine = job.engine
    started = time.perf_counter()  # auto's whole cost: calibration, probes, run, checks
    if not hasattr(engine.settings, "forget_target"):
        raise UserError(f"--config auto holds forget rows at a level: method {config.method!r} has no forget_target "
                        "(use sugd or gd)")
    calibration = Calibration(engine, job.tokenizer, check_data(job.forget_rows, job.retain_rows, split.level,
                                                                split.check, config.seed, earlier))
    calibration.measure_before()
    engine.validator, engine.selection = calibration.check, calibration.selection()
    settle = settle_phases(engine, [row for rows in earlier for row in rows.for_training()])
    examples = document_examples(engine, calibration.data.document_rows)
    engine.arrange_phase = lambda phase, validations: arrange(phase, validations, examples)
    summary, state = calibrated_run(calibration, job.work_dir, resume, settle)
    final = kept_figures(summary.best)
    if final is None:
        with engine.evaluation_view():
            final = judged(calibration.check(engine.unwrapped, answers=True))
    finish_trackers(engine.accelerator)
    record = build_record(job, summary)
    record["auto"] = auto_record(calibration, split, state, settle, earlier)
    record["auto"]["settle_passes_run"] = sum(entry["phase"].startswith("settle") for entry in summary.validations)
    record["verdict"] = held_out.verdict(final, calibration.bounds, {"lr": state["lr"],
                                                                     "chunks_run": len(summary.validations),
                                                                     "chunks": len(engine.phases)})
    record["auto"]["seconds"] = round(time.perf_counter() - started, 2)
    save(job, record)
    if engine.accelerator.is_main_process:
        (job.work_dir / CALIBRATION_FILE).unlink(missing_ok=True)  # run.json's "auto" records the rate
    cleanup(job)
    return record


def kept_figures(best: dict | None) -> dict | None:
    """The check's figures of the state the run kept, when its check went as far as the answers: the
    engine has loaded that state, so reading it again would give the same figures."""
    if best is None or "forget_regurgitated" not in best:
        return None
    return judged(best)


def judged(figures: dict) -> dict:
    """The figures the verdict reports: not the log's place in the run, nor the documents' losses, which
    only arrange the settling passes."""
    return {key: value for key, value in figures.items()
            if key not in ("event", "phase", "chunk", "step", "document_losses")}


def resumed_level(work_dir: Path) -> float | None:
    """The level the last check before an interruption read, which the ceiling had when it stopped."""
    position = work_dir / "state" / "position.json"
    validations = json.loads(position.read_text()).get("validations", []) if position.is_file() else []
    return validations[-1]["level"] if validations else None


def listed(probes: Sequence[Probe]) -> list[dict]:
    return [{"lr": probe.lr, "forget_loss": round(probe.forget_loss, 4), "retain_loss": round(probe.retain_loss, 4),
             "seconds": round(probe.seconds, 2)} for probe in probes]


def auto_record(calibration: Calibration, split, state: dict, settle: list[Phase], earlier: Sequence[Rows]) -> dict:
    """How the run calibrated itself: U's split, the original model's numbers, the rate (probed or
    given), its probes and the starts that confirmed it, and what each settling pass covers."""
    return {"unseen_level_documents": len(split.level), "unseen_check_documents": len(split.check),
            "forget_documents": len(calibration.data.forget_documents), "earlier_forget_sets": len(earlier),
            "earlier_forget_documents": sum(len(whole_documents(rows)) for rows in earlier),
            "settle_forget_rows": sum(item.role == FORGET for item in settle[0].items),
            "before": {key: round(value, 4) for key, value in calibration.before.items()},
            "lr": state["lr"], "lr_source": state["source"], "probes": state["probes"],
            "confirmations": state["confirmations"],
            "probe_seconds": round(sum(probe["seconds"] for probe in state["probes"]), 2),
            "rate_reached_level": state["reached"], "rate_kept_retain": state["retain_ok"]}
