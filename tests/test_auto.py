"""``--config auto``: the rate probe, the stopping rule, U's checks, the verdict and what the run reads."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_when_paused, run_cli

from unlearnlm.auto import check as held_out
from unlearnlm.auto.rate import Probe, choose_rate, next_rate
from unlearnlm.auto.unseen import split_unseen
from unlearnlm.data.overlap import shared_text, sharing_indices

BOUNDS = held_out.Bounds(auc_low=0.3, auc_high=0.7, retain_loss=0.5, regurgitated=0.3, retain_kept=0.9,
                         group_half_widths={held_out.REQUEST_GROUP: 0.3, "Task3": 0.2})


def unseen_documents(target: Path, count: int) -> list[str]:
    """The first of the unseen documents ``unlearnlm target`` wrote beside the target's sets."""
    lines = (target / "benchmark" / "unseen.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:count]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- the rate probe ----------------------------------------------------------------------------------


def test_the_probe_brackets_the_crossing_in_two_octaves_in_three_probes_and_interpolates():
    """A chunk whose loss rises by 1 nat per doubling of the rate, from 0 at 2^-14: it reaches the level
    of 3.5 nats at 2^-10.5. By hand, bisecting the octaves -21 (below 2^-20) .. -5 (above 2^-6): 2^-13
    gives 1, short; 2^-9 gives 5, past; 2^-11 gives 3, short: the bracket (2^-11, 2^-9] is two octaves
    wide after three probes. The loss is linear in log2(rate), so the crossing lies a quarter of the
    way, at 2^-10.5; the retain loss (1e-3 per unit of rate) stays far inside its bound."""
    calls = []

    def probe(lr: float) -> Probe:
        calls.append(lr)
        return Probe(lr, max(0.0, math.log2(lr) + 14), 1e-3 * lr)

    choice = choose_rate(probe, level=3.5, retain_bound=0.1)
    assert calls == [2.0 ** -13, 2.0 ** -9, 2.0 ** -11]
    assert choice.lr == pytest.approx(2.0 ** -10.5, rel=1e-9)
    assert choice.reached and choice.retain_ok


def test_the_probe_steps_down_when_the_rate_that_reaches_the_level_damages_the_retain_set():
    """The retain loss doubles with the rate (0.1 at 2^-10): with a bound of 0.06 the rate at the top
    of the bracket (2^-9, retain loss 0.2) is refused, then 2^-10 (0.1); 2^-11 (0.05) is kept."""
    def probe(lr: float) -> Probe:
        return Probe(lr, max(0.0, math.log2(lr) + 14), 0.1 * lr / 2.0 ** -10)

    choice = choose_rate(probe, level=3.5, retain_bound=0.06)
    assert choice.lr == 2.0 ** -11
    assert choice.retain_ok and not choice.reached


def test_the_run_starts_again_at_half_the_rate_while_its_first_chunks_damage_the_retain_set():
    """The first two chunks leave a retain loss of 0.1 at 2^-10, proportional to the rate. By hand, with
    a bound of 0.03: 2^-10.5 gives 0.0707 and 2^-11.5 gives 0.0354, both above it, so each is halved;
    2^-12.5 gives 0.0177 and the run goes on. With a bound of 0.001 no halving within the three allowed
    is enough: after the fourth start the run goes on anyway (and the verdict will say so)."""
    def retain_loss(lr: float) -> float:
        return 0.1 * lr / 2.0 ** -10

    def starts(bound: float) -> list[float]:
        rates, losses = [2.0 ** -10.5], []
        while True:
            losses.append(retain_loss(rates[-1]))
            lower = next_rate(losses, bound, rates[-1])
            if lower is None:
                return rates
            rates.append(lower)

    assert starts(0.03) == pytest.approx([2.0 ** -10.5, 2.0 ** -11.5, 2.0 ** -12.5], rel=1e-12)
    assert starts(0.001) == pytest.approx([2.0 ** -10.5, 2.0 ** -11.5, 2.0 ** -12.5, 2.0 ** -13.5], rel=1e-12)


@pytest.mark.parametrize(("stop", "retain_loss", "again"), [
    ("completed", 0.02, None),  # retain kept: go on
    ("completed", 0.5, 2.0 ** -11),  # retain damaged: half the rate
    ("diverged", None, 2.0 ** -11),  # diverged: as damaged, recorded with no loss
    ("selected", 0.5, None),  # the check was met: kept
    ("max_steps", 0.5, None),  # a limit reached: nothing left to train
])
def test_a_start_of_the_run_is_kept_or_started_again_at_half_the_rate(stop, retain_loss, again):
    from unlearnlm.auto.run import judged_start
    from unlearnlm.engine import RunSummary, Stop

    summary = RunSummary(stop=Stop(stop), validations=[] if retain_loss is None else [{"retain_loss": retain_loss}])
    state = {"lr": 2.0 ** -10, "confirmations": []}
    assert judged_start(state, summary, retain_bound=0.1, seconds=1.0) == again
    assert state["confirmations"] == [{"lr": 2.0 ** -10, "seconds": 1.0, "retain_loss": retain_loss}]


def test_a_chunks_rows_are_read_through_its_examples_keys():
    """A long raw document trains as several windows (examples) keyed by its row: the chunk holding
    examples 3, 4 and 5 (windows 1 and 2 of row 1, row 2 whole) trains rows 1 and 2, by hand."""
    from types import SimpleNamespace

    from unlearnlm.auto.run import trained_rows
    from unlearnlm.data.schedule import FORGET, RETAIN

    examples = [SimpleNamespace(meta={"key": key}) for key in ("f0w0", "f0w1", "f1w0", "f1w1", "f1w2", "f2")]
    items = [SimpleNamespace(role=FORGET, index=index) for index in (3, 4, 5)] + [SimpleNamespace(role=RETAIN, index=0)]
    engine = SimpleNamespace(examples={FORGET: examples}, rows={FORGET: ["row 0", "row 1", "row 2"]},
                             phases=[None, SimpleNamespace(items=items)])
    assert trained_rows(engine, 1) == ["row 1", "row 2"]


def test_the_real_probe_picks_a_rate_between_one_that_leaves_the_first_chunk_below_the_level_and_one_that_reaches_it(
        auto_run):
    """On the micro target, one document per chunk: the probes are the first chunk trained at each rate.
    Their records say where the chunk's loss crosses the level; the run's first start lies between the
    two probes around the crossing, each later start halves it because the one before broke the retain
    bound after its first two chunks, and the run trains at the last."""
    auto = auto_run["record"]["auto"]
    level, bound = auto["before"]["level"], auto_run["record"]["verdict"]["bounds"]["retain_loss"]
    probes = sorted(auto["probes"], key=lambda probe: probe["lr"])
    below = [probe["lr"] for probe in probes if probe["forget_loss"] < level]
    above = [probe["lr"] for probe in probes if probe["forget_loss"] >= level]
    assert below and above  # the bracket 2^-20 .. 2^-6 holds the crossing on this target
    assert min(above) / max(below) <= 4  # the bisection narrowed the bracket to two octaves (or a step down to one)
    confirmations = auto["confirmations"]
    assert confirmations and max(below) < confirmations[0]["lr"] <= min(above)
    for earlier, later in zip(confirmations, confirmations[1:]):
        assert earlier["retain_loss"] > bound and later["lr"] == pytest.approx(earlier["lr"] / 2, rel=1e-12)
    assert auto["lr"] == confirmations[-1]["lr"] == auto_run["record"]["config"]["optim"]["lr"]  # the run trained at it


# --- the stopping rule -------------------------------------------------------------------------------


def figures(auc: float, ks_p: float = 0.5, retain_loss: float = 0.1, regurgitated: float | None = 0.1,
            kept: float = 1.0) -> dict:
    record = {"forget_loss": 4.0, "unseen_loss": 4.0, "mia_auc": auc, "mia_score": 1 - 2 * abs(auc - 0.5),
              "ks_distance": 0.1, "ks_p": ks_p, "retain_loss": retain_loss, "level": 4.0}
    if regurgitated is not None:
        record.update(forget_regurgitated=regurgitated, retain_kept=kept)
    return record


@pytest.mark.parametrize(("state", "met"), [
    (figures(0.5), True),
    (figures(0.9), False),  # the attack still tells the forget documents apart
    (figures(0.1), False),  # pushed past unseen text: told apart the other way
    (figures(0.5, ks_p=0.01), True),  # losses bunched at the level: reported, not judged
    (figures(0.5, ks_p=0.01, regurgitated=0.5), False),  # an AUC near 0.5 from documents on both sides: stage 2
    (figures(0.5, retain_loss=0.6), False),
    (figures(0.5, regurgitated=0.4), False),
    (figures(0.5, kept=0.8), False),
    (figures(0.5, regurgitated=None), False),  # stage 2 not run: not met
])
def test_the_check_is_met_only_when_every_part_of_it_is(state, met):
    assert held_out.met(state, BOUNDS) is met


@pytest.mark.parametrize(("group_figures", "met"), [
    ({"group_mia_auc": {held_out.REQUEST_GROUP: 0.75, "Task3": 0.6}, "request_regurgitated": 0.2}, True),  # wider bounds
    ({"group_mia_auc": {held_out.REQUEST_GROUP: 0.85, "Task3": 0.6}, "request_regurgitated": 0.2}, False),  # still seen
    ({"group_mia_auc": {held_out.REQUEST_GROUP: 0.15, "Task3": 0.6}, "request_regurgitated": 0.2}, False),  # pushed past
    ({"group_mia_auc": {held_out.REQUEST_GROUP: 0.5, "Task3": 0.75}, "request_regurgitated": 0.2}, False),  # one kind seen
    ({"group_mia_auc": {held_out.REQUEST_GROUP: 0.5, "Task3": 0.25}, "request_regurgitated": 0.2}, True),  # a kind past U
    ({"group_mia_auc": {held_out.REQUEST_GROUP: 0.5, "Task3": 0.5}, "request_regurgitated": 0.4}, False),  # own answers
])
def test_each_group_of_forget_documents_must_pass_alone_too(group_figures, met):
    """All the checked documents together pass (AUC 0.5, regurgitated 0.1); a group of them may not:
    a ledger request's own documents (bound 0.5 +- 0.3 here, either side) or one kind of document
    (0.5 +- 0.2, still seen only: a kind other than U's reads as past U after retraining too)."""
    assert held_out.met({**figures(0.5), **group_figures}, BOUNDS) is met


def test_the_verdict_names_each_group_outside_its_bound_and_which_side():
    """A request's own documents pushed past unseen text (0.15, bound 0.5 +- 0.3) and a kind still seen
    (Task3 at 0.75, bound at most 0.7): not forgotten, both named in the summary and the advice."""
    state = {**figures(0.5), "group_mia_auc": {held_out.REQUEST_GROUP: 0.15, "Task3": 0.75}, "request_regurgitated": 0.1}
    verdict = held_out.verdict(state, BOUNDS)
    assert verdict["forgotten"] is False
    assert "this request MIA AUC 0.15 (bound 0.5 ± 0.30), Task3 MIA AUC 0.75 (bound at most 0.70)" in verdict["summary"]
    assert any("this request: pushed past, Task3: still seen" in tip for tip in verdict["advice"])


def test_a_groups_auc_bound_is_wider_by_its_fewer_documents():
    """36 documents checked against 32 held-out ones, 12 of them in a group: half-widths
    2 sqrt(69 / (12 * 36 * 32)) = 0.14130 and 2 sqrt(45 / (12 * 12 * 32)) = 0.19764 (Hanley and McNeil)."""
    bounds = held_out.make_bounds(36, 32, 0.1, 3.0, 0.05, 0.1, 0.1, 0.9, groups={"Task3": 12})
    assert bounds.auc_high - 0.5 == pytest.approx(0.14130, abs=1e-5)
    assert bounds.group_half_widths["Task3"] == pytest.approx(0.19764, abs=1e-5)


def test_the_groups_are_a_requests_own_documents_and_each_kind_when_there_are_several():
    """SemEval rows: one document per sentence completion, of its task; raw documents: one kind, no
    kind group; earlier forget sets: the request's own documents come first and form a group."""
    from unlearnlm.auto.measure import check_data
    from unlearnlm.data.raw import Rows
    from unlearnlm.data.records import Record

    def semeval(*tasks: str) -> Rows:
        return Rows("x", "0", tuple(Record(id=f"t-{number}{kind}1", input=f"{task} {number} {kind} a b", output="c d",
                                           task=task) for number, task in enumerate(tasks) for kind in ("sc", "qa")))

    mixed, raw = semeval("Task1", "Task3", "Task3"), Rows("y", "1", documents=("one two three", "four five six"))
    data = check_data(mixed, raw, ["u v"], ["w x"], 0)
    assert data.forget_kinds == ["Task1", "Task3", "Task3"]
    assert data.groups == {"Task1 documents": [0], "Task3 documents": [1, 2]}
    assert check_data(raw, mixed, ["u v"], ["w x"], 0).groups == {}
    ledger = check_data(semeval("Task3"), raw, ["u v"], ["w x"], 0, earlier=[semeval("Task1", "Task3")])
    assert ledger.forget_kinds == ["Task3", "Task1", "Task3"]
    assert ledger.groups == {held_out.REQUEST_GROUP: [0], "Task3 documents": [0, 2], "Task1 documents": [1]}
    hostile = check_data(semeval(held_out.REQUEST_GROUP, "Task3"), raw, ["u v"], ["w x"], 0, earlier=[semeval("Task1")])
    assert len(hostile.groups) == 4  # a task named like the request's group is a kind of its own


def test_group_aucs_read_each_group_alone():
    """Forget losses 1, 2, 9 against unseen 5, 6: the first two are below both unseen losses (AUC 1),
    the third above both (AUC 0); together 4 of 6 pairs, 2/3."""
    aucs = held_out.group_aucs([1.0, 2.0, 9.0], [5.0, 6.0], {"low": [0, 1], "high": [2], "all": [0, 1, 2]})
    assert aucs == {"low": 1.0, "high": 0.0, "all": pytest.approx(2 / 3)}


def test_the_state_kept_is_met_first_then_the_one_that_kept_the_retain_set():
    """Met beats everything; among the rest a state whose retain answers were lost (stage 2 read them)
    ranks below those still recognised whose retain loss is within bounds; among these, fewer kinds
    still seen beats an AUC nearer chance."""
    met_state = figures(0.5)
    lost_retain = figures(0.5, kept=0.5)  # stage 1 passed, R's answers lost
    no_kind_seen = {**figures(0.8, regurgitated=None), "group_mia_auc": {"Task3": 0.6}}
    one_kind_seen = {**figures(0.75, regurgitated=None), "group_mia_auc": {"Task3": 0.8}}
    ordered = sorted([lost_retain, one_kind_seen, met_state, no_kind_seen], key=lambda state: held_out.rank(state, BOUNDS),
                     reverse=True)
    assert ordered == [met_state, no_kind_seen, one_kind_seen, lost_retain]


def test_retain_kept_reads_each_term_alone_and_combines_them_by_their_harmonic_mean():
    """Terms before 1.0, 0.8 and 0 (never answered: left out); after 0.5, 1.0 (a rise, counted as 1)
    and 0.3: ratios 0.5 and 1, harmonic mean 2 / (2 + 1) = 2/3. A plain mean over the rows, three rows
    of each term, would read (1.5 + 3.0 + 0.9) / (3.0 + 2.4) = 1.0: all kept."""
    after = held_out.term_means([0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3], ["a"] * 3 + ["b"] * 3 + ["c"] * 3)
    assert after == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.3})
    assert held_out.retain_kept(after, {"a": 1.0, "b": 0.8, "c": 0.0}) == pytest.approx(2 / 3)
    assert held_out.retain_kept({"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 1.0}) == 0.0  # one term lost: nothing kept
    assert held_out.retain_kept({}, {}) == 1.0


def test_the_run_stops_at_the_first_chunk_whose_check_is_met_and_keeps_that_state(micro_model_dir, micro_data_dir, tmp_path):
    """Four chunks; the check (a stand-in reading the chunk's number) is met from chunk 2 on: the run
    stops after chunk 2, with the steps of two chunks, and keeps chunk 2's state."""
    from unlearnlm.config import load_config
    from unlearnlm.recipe import setup

    config = load_config("auto", ["schedule.chunk_size=3", "max_length=32"])  # 12 forget rows: 4 chunks
    run = setup(micro_model_dir, micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", tmp_path / "out", config,
                False, False, False)
    engine = run.engine
    checked = []

    def validator(model) -> dict:
        checked.append(len(checked) + 1)
        return figures(0.9) if len(checked) < 2 else figures(0.5)

    engine.validator = validator
    engine.selection = held_out_selection()
    summary = engine.run()
    assert len(engine.phases) == 4 and checked == [1, 2]
    assert summary.stop.value == "selected" and "after chunk 2" in summary.stopped_reason
    assert summary.steps == sum(engine.steps_per_epoch[:2]) * config.schedule.epochs_per_chunk
    assert summary.best["chunk"] == 2


def test_settling_passes_each_cover_every_forget_row_and_fresh_retain_rows_and_stop_at_the_first_met(
        micro_model_dir, micro_data_dir, tmp_path):
    """12 forget rows in one chunk, then 3 settling passes at 1:3 over 24 retain rows: each pass holds the
    12 forget rows once and 36 retain rows, cyclically (0..23, 0..11), the second pass's going on from
    where the first's ended (12..23, 0..23); a check met after the second pass stops the run there."""
    from unlearnlm.auto.settle import settle_phases
    from unlearnlm.config import load_config
    from unlearnlm.data.schedule import FORGET, RETAIN
    from unlearnlm.recipe import setup

    config = load_config("auto", ["schedule.chunk_size=12", "max_length=32", "auto.settle_passes=3"])
    run = setup(micro_model_dir, micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", tmp_path / "out", config,
                False, False, False)
    engine = run.engine
    assert len(engine.examples[FORGET]) == 12 and len(engine.examples[RETAIN]) == 24
    passes = settle_phases(engine, [])
    assert [phase.name for phase in passes] == ["settle 1", "settle 2", "settle 3"]
    for phase in passes:
        assert sorted(item.index for item in phase.items if item.role == FORGET) == list(range(12))
    retain = [[item.index for item in phase.items if item.role == RETAIN] for phase in passes]
    assert retain[0] == [*range(24), *range(12)] and retain[1] == [*range(12, 24), *range(24)]
    for phase in passes:
        engine.add_phase(phase)
    checked = []

    def validator(model) -> dict:
        checked.append(len(checked) + 1)
        return figures(0.2) if len(checked) < 3 else figures(0.5)  # met after the chunk and two passes

    engine.validator, engine.selection = validator, held_out_selection()
    summary = engine.run()
    assert checked == [1, 2, 3] and summary.best["phase"] == "settle 2"
    assert "after settle 2" in summary.stopped_reason


def test_shares_are_proportional_to_the_weights_in_whole_steps_by_largest_remainder():
    """6 steps over weights 0.5, 0, 0.5, 1.5 (sum 2.5): exactly 1.2, 0, 1.2, 3.6; whole 1, 0, 1, 3 and
    the step left to the largest remainder (0.6). No weight at all: even, the remainder to the first."""
    from unlearnlm.auto.settle import shares, spread

    assert shares([0.5, 0.0, 0.5, 1.5], 6) == [1, 0, 1, 4]
    assert shares([0.0, 0.0, 0.0], 4) == [2, 1, 1]
    assert spread([[1, 1], [], [3, 3, 3], [2]]) == [1, 3, 2, 1, 3, 3]


def test_a_documents_rows_are_its_completion_and_its_questions_and_earlier_sets_follow(micro_data_dir):
    from unlearnlm.auto.measure import check_data, kinded_documents
    from unlearnlm.data.raw import read_rows

    forget = read_rows(micro_data_dir / "forget.jsonl", "forget")
    records = forget.for_training()
    documents = kinded_documents(forget)
    groups = [rows for _, _, rows in documents]
    completions = [row for row in records if row.kind == "sc"]
    assert len(groups) == len(completions)
    for (text, kind, group), completion in zip(documents, completions):
        assert text == completion.input + " " + completion.output and kind == completion.task
        assert {records[index].document_id for index in group} == {completion.document_id}
    assert sorted(index for group in groups for index in group) == list(range(len(records)))
    raw = read_rows([{"text": "one two three"}, {"text": "four five six"}], "forget")
    data = check_data(forget, forget, ["a b"], ["c d"], 0, earlier=[raw])
    assert data.document_rows == groups + [[len(records)], [len(records) + 1]]


def test_a_settling_pass_shares_its_forget_steps_by_each_documents_distance_from_the_level(
        micro_model_dir, micro_data_dir, tmp_path):
    """The check before the pass reads the first of the 6 documents (2 rows each) 1 nat below the level,
    the second 0.5 above it, the others at it: distances plus their mean 0.25 are 1.25, 0.75 and 0.25
    four times (sum 3), so the pass's 12 forget steps go 5, 3, 1, 1, 1, 1, taken in turns, each
    document going round its rows; the retain steps do not change."""
    from unlearnlm.auto.measure import kinded_documents
    from unlearnlm.auto.settle import arrange, document_examples, settle_phases
    from unlearnlm.config import load_config
    from unlearnlm.data.raw import read_rows
    from unlearnlm.data.schedule import FORGET, RETAIN
    from unlearnlm.recipe import setup

    config = load_config("auto", ["schedule.chunk_size=12", "max_length=32", "auto.settle_passes=2"])
    run = setup(micro_model_dir, micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", tmp_path / "out", config,
                False, False, False)
    engine = run.engine
    passes = settle_phases(engine, [])
    rows = [rows for _, _, rows in kinded_documents(read_rows(micro_data_dir / "forget.jsonl", "forget"))]
    examples = document_examples(engine, rows)
    assert examples == rows  # one example per row: no row is longer than the context
    losses = [3.0, 4.5] + [4.0] * (len(rows) - 2)
    check = {**figures(0.9), "level": 4.0, "document_losses": losses}
    arranged = arrange(passes[0], [check], examples)
    forget = [item.index for item in arranged.items if item.role == FORGET]
    assert len(forget) == 12 and [item for item in arranged.items if item.role == RETAIN] == \
        [item for item in passes[0].items if item.role == RETAIN]
    assert examples[:3] == [[0, 1], [2, 3], [4, 5]] and len(examples) == 6
    assert forget == [0, 2, 4, 6, 8, 10, 1, 3, 0, 2, 1, 0]
    assert arrange(passes[0], [figures(0.9)], examples) is passes[0]  # a check with no document losses
    assert arrange(engine.phases[0], [check], examples) is engine.phases[0]  # a chunk

    for phase in passes:
        engine.add_phase(phase)
    engine.arrange_phase = lambda phase, validations: arrange(phase, validations, examples)
    engine.validator, engine.selection = (lambda model: check), held_out_selection()
    engine.run()
    assert [[item.index for item in phase.items if item.role == FORGET] for phase in engine.phases[-2:]] == [forget, forget]


def held_out_selection():
    from unlearnlm.evaluation.metrics import Selection

    return Selection(better=lambda new, old: held_out.rank(new, BOUNDS) > held_out.rank(old, BOUNDS),
                     done=lambda scores: held_out.met(scores, BOUNDS))


# --- U ------------------------------------------------------------------------------------------------


def test_a_document_sharing_thirteen_words_with_another_text_is_found():
    text = " ".join(f"w{index}" for index in range(40))
    assert shared_text(["a b c " + " ".join(f"w{index}" for index in range(10, 23)) + " z"], [text]) == 0
    assert shared_text(["a b c " + " ".join(f"w{index}" for index in range(10, 22)) + " z"], [text]) is None  # 12 words
    assert shared_text(["x y", "w3 w4 w5"], [text]) == 1  # shorter than 13 words: contained whole


def test_the_split_is_seeded_and_holds_every_document_once():
    documents = [f"document {index}" for index in range(9)]
    split = split_unseen(documents, seed=0)
    assert len(split.level) == 4 and len(split.check) == 5
    assert sorted(split.level + split.check) == documents
    assert split_unseen(documents, seed=0) == split


def test_an_unseen_set_that_overlaps_the_forget_set_is_refused_in_one_line(micro_model_dir, micro_data_dir, tmp_path, capsys):
    forget = [json.loads(line) for line in (micro_data_dir / "forget.jsonl").read_text().splitlines()]
    leaked = forget[0]["input"] + " " + forget[0]["output"]
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"document": text} for text in ["one two three four", "five six", leaked,
                                                                                       "seven eight nine"]])
    code = run_cli("unlearn", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl", "--retain",
                   micro_data_dir / "retain.jsonl", "--unseen", unseen, "--config", "auto", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == ["error: --unseen document 3 shares text with the forget set (13 words or more): "
                                        "U must be text the model was not fine-tuned on"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--config", "auto"], "error: --config auto needs --unseen U"),
    (["--config", "sugd-level", "--unseen", "UNSEEN"], "error: --unseen is read by --config auto only"),
])
def test_auto_and_unseen_go_together(micro_model_dir, micro_data_dir, tmp_path, capsys, options, message):
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": f"unseen text number {index}"} for index in range(4)])
    code = run_cli("unlearn", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl", "--retain",
                   micro_data_dir / "retain.jsonl", "--out", tmp_path / "out",
                   *[unseen if option == "UNSEEN" else option for option in options])
    assert code == 2
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize(("case", "message"), [
    ("fifo", "not a regular file"),
    ("link loop", "a symbolic link that leads nowhere"),
    ("duplicate documents", "--unseen document 3 repeats document 1: give each document once"),
    ("retain_kept above 1", "setting 'auto.retain_kept': must be at most 1, got 2.0"),
    ("--val-forget and --val-retain", "--config auto checks itself on held-out unseen text: leave out the --val-* sets"),
    ("--val-general alone", "--config auto checks itself on held-out unseen text: leave out the --val-* sets"),
])
def test_bad_auto_input_is_one_line_exit_2_and_nothing_is_written(micro_model_dir, micro_data_dir, tmp_path, capsys, case,
                                                                  message):
    texts = [f"unseen text number {index} about a harbour" for index in range(4)]
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": text} for text in texts[:2] + texts])
    options = []
    if case == "fifo":  # read, it would block forever
        unseen = tmp_path / "fifo.jsonl"
        os.mkfifo(unseen)
    elif case == "link loop":
        unseen = tmp_path / "loop.jsonl"
        unseen.symlink_to(tmp_path / "loop2.jsonl")
        (tmp_path / "loop2.jsonl").symlink_to(unseen)
    elif case != "duplicate documents":
        unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": text} for text in texts])
        options = {"retain_kept above 1": ["--set", "auto.retain_kept=2"],
                   "--val-forget and --val-retain": ["--val-forget", micro_data_dir / "forget.jsonl", "--val-retain",
                                                     micro_data_dir / "retain.jsonl"],
                   "--val-general alone": ["--val-general", micro_data_dir / "retain.jsonl"]}[case]
    code = run_cli("unlearn", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl", "--retain",
                   micro_data_dir / "retain.jsonl", "--unseen", unseen, "--config", "auto", "--out", tmp_path / "out",
                   *options)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*partial*"))


def test_the_target_writes_unseen_pool_documents_that_share_no_text_with_any_set(micro_target):
    from unlearnlm.data.records import load_documents, load_records
    from unlearnlm.data.sets import MIA_TASK, UNSEEN_DOCUMENTS, pretraining_pool

    sets = micro_target[0] / "benchmark"
    unseen = unseen_documents(micro_target[0], UNSEEN_DOCUMENTS + 1)
    assert len(unseen) == UNSEEN_DOCUMENTS == len(set(unseen))
    assert set(unseen) <= {doc.text() for doc in pretraining_pool() if doc.task == MIA_TASK}  # seen in pretraining only
    texts = [row.input + " " + row.output for name in ("forget", "retain", "general")
             for row in load_records(sets / f"{name}.jsonl", "retain")]
    texts += load_documents(sets / "mia_members.jsonl") + load_documents(sets / "mia_nonmembers.jsonl")
    assert sharing_indices(unseen, texts) == []


# --- a whole run on the micro target --------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_run(micro_target, tmp_path_factory) -> dict:
    """``unlearn --config auto`` on the micro target, recording every file the process opens."""
    target = micro_target[0]
    work = tmp_path_factory.mktemp("auto")
    unseen = write_jsonl(work / "unseen.jsonl", [{"text": text} for text in unseen_documents(target, 8)])
    opened: list[str] = []

    def record(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(record)
    code = run_cli("unlearn", "--model", target, "--forget", target / "benchmark" / "forget.jsonl", "--retain",
                   target / "benchmark" / "retain.jsonl", "--unseen", unseen, "--config", "auto", "--out", work / "out",
                   "--set", "schedule.chunk_size=1")  # ten chunks: the rate is confirmed on the first two
    files = list(opened)
    opened.clear()  # the hook stays installed (audit hooks cannot be removed); it records into a list no one reads
    assert code == 0
    return {"target": target, "unseen": unseen, "out": work / "out", "opened": files,
            "record": json.loads((work / "out" / "run.json").read_text())}


def test_auto_reads_only_the_model_the_forget_and_retain_sets_and_the_unseen_documents(auto_run):
    target, out = auto_run["target"], auto_run["out"]
    read = {Path(path).resolve() for path in auto_run["opened"]}
    inside = [path for path in read if path.is_relative_to(target.resolve())]
    allowed = {target / "benchmark" / "forget.jsonl", target / "benchmark" / "retain.jsonl"}
    model_files = {path for path in inside if path.parent == target.resolve()}
    assert {path for path in inside if path not in model_files} <= {path.resolve() for path in allowed}
    assert not any(path.name.startswith(("mia_", "general")) for path in read)  # no evaluation set
    assert not any((target / "oracle").resolve() in path.parents for path in read)  # no oracle
    assert auto_run["unseen"].resolve() in read
    assert (out / "run.json").is_file()


def test_the_start_that_confirmed_the_rate_is_the_run_and_no_chunk_trains_twice(auto_run):
    """The first two chunks that confirm the rate are kept as the run's: the published log is one pass
    over the schedule (steps 1..N, chunks in order, one check after each of the 10 chunks and after each
    settling pass run, at most 3, none after the first met), and the run trained as many steps as that
    much of the schedule has, by hand: 10 chunks of one forget row and 3 retain rows (one batch of 4)
    for 3 epochs, then each settling pass over the 10 forget rows with 30 retain rows (10 batches)
    once: 10 * 3 + 10 per pass."""
    rows = [json.loads(line) for line in (auto_run["out"] / "unlearn_log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "event" not in row]
    checks = [row for row in rows if row.get("event") == "validation"]
    passes = len(checks) - 10
    assert 1 <= passes <= 3
    assert [row["step"] for row in steps] == list(range(1, len(steps) + 1))
    assert [row["phase"] for row in checks] == ([f"chunk {index}" for index in range(1, 11)]
                                                + [f"settle {number}" for number in range(1, passes + 1)])
    assert passes == 3 or auto_run["record"]["verdict"]["forgotten"]
    assert auto_run["record"]["auto"]["settle_passes_run"] == passes
    assert auto_run["record"]["steps"] == len(steps) == 30 + 10 * passes
    assert auto_run["record"]["auto"]["confirmations"][-1]["lr"] == auto_run["record"]["auto"]["lr"]


def test_the_verdict_equals_a_recomputation_from_the_documents_losses(auto_run):
    """The kept model's loss on each forget document and held-out unseen document, computed here with
    transformers' own loss; the AUC with scikit-learn; the KS test with SciPy."""
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearnlm.data.records import load_records

    record, out = auto_run["record"], auto_run["out"]
    verdict = record["verdict"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    model.eval()

    def loss(text: str) -> float:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    completions = [row for row in load_records(auto_run["target"] / "benchmark" / "forget.jsonl", "forget") if row.kind == "sc"]
    forget = [row.input + " " + row.output for row in completions]
    unseen = [json.loads(line)["text"] for line in auto_run["unseen"].read_text().splitlines()]
    check = split_unseen(unseen, record["seed"]).check
    forget_losses, unseen_losses = [loss(text) for text in forget], [loss(text) for text in check]
    auc = roc_auc_score([1] * len(forget) + [0] * len(check), [-value for value in forget_losses + unseen_losses])
    # Rounded to 4 places in run.json; a batched forward differs from one at a time by float rounding.
    assert verdict["forget_loss"] == pytest.approx(np.mean(forget_losses), abs=2e-4)
    assert verdict["unseen_loss"] == pytest.approx(np.mean(unseen_losses), abs=2e-4)
    assert verdict["mia_auc"] == pytest.approx(auc, abs=1e-4)
    assert verdict["ks_p"] == pytest.approx(ks_2samp(forget_losses, unseen_losses).pvalue, abs=1e-4)
    half = 2 * math.sqrt((len(forget) + len(check) + 1) / (12 * len(forget) * len(check)))
    assert verdict["bounds"]["auc_high"] == pytest.approx(0.5 + max(0.1, half), abs=1e-4)
    kinds = sorted({row.task for row in completions})
    assert len(kinds) > 1  # so each kind is judged alone too
    kind_aucs = {kind: roc_auc_score([1] * sum(row.task == kind for row in completions) + [0] * len(check),
                                     [-value for row, value in zip(completions, forget_losses) if row.task == kind]
                                     + [-value for value in unseen_losses]) for kind in kinds}
    assert verdict["group_mia_auc"] == pytest.approx({f"{kind} documents": auc for kind, auc in kind_aucs.items()}, abs=1e-4)
    kinds_pass = all(kind_aucs[kind] - 0.5 <= verdict["bounds"]["group_half_widths"][f"{kind} documents"]
                     for kind in kinds)  # still seen only
    assert verdict["forgotten"] == (verdict["bounds"]["auc_low"] <= auc <= verdict["bounds"]["auc_high"] and kinds_pass
                                    and verdict["retain_loss"] <= verdict["bounds"]["retain_loss"]
                                    and verdict["forget_regurgitated"] <= verdict["bounds"]["regurgitated"]
                                    and verdict["retain_kept"] >= verdict["bounds"]["retain_kept"])
    assert verdict["summary"] in (out / "README.md").read_text()


# --- two processes --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_calibrate_check_and_judge_as_one_does(micro_model_dir, micro_data_dir, tmp_path):
    """DDP on two CPU processes and one process, raw documents and LoRA: the same probes, rate, stopping
    point and verdict (the check's losses are gathered from both processes' shares, and every process
    decides on the main one's scores). Sums of halves differ from whole sums by float rounding only."""
    import os
    import subprocess

    from unlearnlm.data.overlap import sharing_indices
    from unlearnlm.data.sets import MIA_TASK, pretraining_pool

    rows = [json.loads(line) for name in ("forget.jsonl", "retain.jsonl")
            for line in (micro_data_dir / name).read_text().splitlines()]
    pool = [doc.text() for doc in pretraining_pool() if doc.task == MIA_TASK]
    sharing = set(sharing_indices(pool, [row["input"] + " " + row["output"] for row in rows]))
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": text} for index, text in enumerate(pool[:40])
                                                      if index not in sharing][:8])
    for name in ("forget", "retain"):  # the rows' texts as raw documents
        lines = (micro_data_dir / f"{name}.jsonl").read_text().splitlines()
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": row["input"] + " " + row["output"]} for row in map(json.loads, lines)])
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = ["-m", "unlearnlm", "unlearn", "--model", str(micro_model_dir), "--forget", str(tmp_path / "forget.jsonl"),
            "--retain", str(tmp_path / "retain.jsonl"), "--unseen", str(unseen), "--config", "auto",
            "--set", "max_length=48", "--set", "lora.enabled=true"]
    launches = {"two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                "one": [sys.executable]}
    records = {}
    for name, launch in launches.items():
        done = subprocess.run([*launch, *args, "--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        records[name] = json.loads((tmp_path / name / "run.json").read_text())
    two, one = records["two"], records["one"]
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["data"]["raw_documents"]
    assert [probe["lr"] for probe in two["auto"]["probes"]] == [probe["lr"] for probe in one["auto"]["probes"]]
    assert two["auto"]["lr"] == pytest.approx(one["auto"]["lr"], rel=1e-3)
    assert two["stopped_reason"] == one["stopped_reason"]
    assert two["verdict"]["forgotten"] == one["verdict"]["forgotten"]
    for key in ("forget_loss", "unseen_loss", "retain_loss"):
        assert two["verdict"][key] == pytest.approx(one["verdict"][key], rel=1e-2)


# --- the bench ------------------------------------------------------------------------------------------


def test_the_bench_runs_auto_with_no_tuning_run_whatever_the_grid(tmp_path, monkeypatch):
    """With a grid of three rates, a tuned variant runs three tuning runs and one reported run; auto runs
    only the reported one, with its preset's settings and no learning rate of the bench's."""
    from rich.console import Console

    from unlearnlm.bench import run as bench_run
    from unlearnlm.bench.variants import variants

    calls = []

    def finished_run(run_dir, target, forget, overrides, scorer, settle=None, batch_size=16):
        calls.append((run_dir.name, overrides))
        return {"wall_seconds": 0.0, "steps": 1, "stopped_reason": "completed"}, {
            "final": 0.5, "task_aggregate": 0.5, "mia_score": 0.5, "utility": 0.5}

    monkeypatch.setattr(bench_run, "finished_run", finished_run)
    monkeypatch.setattr(bench_run, "_run_facts", lambda run: {})
    monkeypatch.setattr(bench_run, "_trajectory", lambda run_dir: None)
    options = bench_run.BenchOptions(out=tmp_path, grid=[0.5, 1.0, 2.0], trajectory=False, draws=1)
    tune = bench_run.TUNE
    stage = bench_run.Stage(options, {0: tmp_path, tune: tmp_path}, {}, {0: 3.0, tune: 3.0}, tmp_path, Console(quiet=True))
    table = variants(n_layers=2)
    tried, reported = bench_run.method_runs(stage, table["auto"])
    assert tried == [] and [name for name, _ in calls] == ["auto-d0-seed0"]
    assert "auto.enabled=true" in calls[0][1] and not any(item.startswith("optim.lr=") for item in calls[0][1])
    calls.clear()
    tried, _ = bench_run.method_runs(stage, table["sugd"])
    assert len(tried) == 3 and len(calls) == 4


# --- a kill, then --resume ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [2, 3, 6])
def test_a_killed_auto_run_resumes_to_the_uninterrupted_model(micro_target, tmp_path, checkpoint):
    """Killed at its 2nd checkpoint write (after the first chunk of the first start), its 3rd (after
    chunk 2: where the start is judged) and its 6th (later in the run, or in a start at half the rate),
    then resumed: the same rate, steps, log and weights as a run never killed."""
    import os
    import subprocess

    from safetensors.torch import load_file

    target = micro_target[0]
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": text} for text in unseen_documents(target, 8)])
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}

    def command(out: Path, *flags: str) -> list[str]:
        return [sys.executable, "-m", "unlearnlm", "unlearn", "--model", str(target), "--forget",
                str(target / "benchmark" / "forget.jsonl"), "--retain", str(target / "benchmark" / "retain.jsonl"),
                "--unseen", str(unseen), "--config", "auto", "--set", "schedule.chunk_size=1", "--out", str(out), *flags]

    paused = tmp_path / "paused"
    killed = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**env, "UNLEARNLM_TEST_PAUSE_AT": f"written:{checkpoint}",
                                   "UNLEARNLM_TEST_PAUSE_FILE": str(paused)})
    kill_when_paused(killed, paused)
    for out, flags in ((tmp_path / "killed", ("--resume",)), (tmp_path / "straight", ())):
        done = subprocess.run(command(out, *flags), env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    resumed, straight = (json.loads((tmp_path / name / "run.json").read_text()) for name in ("killed", "straight"))
    assert resumed["auto"]["lr"] == straight["auto"]["lr"] and resumed["steps"] == straight["steps"]
    assert [entry["lr"] for entry in resumed["auto"]["confirmations"]] == \
        [entry["lr"] for entry in straight["auto"]["confirmations"]]
    logs = [[(row.get("step"), row.get("loss"), row.get("mia_auc")) for row in
             map(json.loads, (tmp_path / run / "unlearn_log.jsonl").read_text().splitlines())] for run in ("killed", "straight")]
    assert logs[0] == logs[1]
    first, second = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("killed", "straight"))
    assert sorted(first) == sorted(second) and all(torch.equal(first[key], second[key]) for key in first)
