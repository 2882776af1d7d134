"""The benchmark's sets: whole documents, disjoint sets, disjoint and reproducible draws, the manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from unlearnlm.data.records import load_documents, load_records
from unlearnlm.data.sets import PRESETS, SET_FILES, TASKS, BenchmarkSets, bundled_lume_dir, draw_sets, write_sets
from unlearnlm.errors import UserError


def ids(documents) -> set[str]:
    return {document.id for document in documents}


def source_documents(part: str, split: str) -> dict[str, list[str]]:
    """Row ids of every document of one bundled file, in file order."""
    documents: dict[str, list[str]] = {}
    for row in load_records(bundled_lume_dir() / part, split):
        documents.setdefault(row.document_id, []).append(row.id)
    return documents


@pytest.fixture(scope="module")
def mini() -> BenchmarkSets:
    return draw_sets(size="mini", seed=0, draw=0)


def test_sets_are_disjoint_and_sized(mini: BenchmarkSets) -> None:
    forget, retain, general = ids(mini.forget), ids(mini.retain), ids(mini.general)
    assert not forget & retain and not forget & general and not retain & general
    for documents in (mini.forget, mini.retain, mini.general):
        assert Counter(document.task for document in documents) == {task: 4 for task in TASKS}
    assert ids(mini.mia_members) == {document.id for document in mini.forget if document.task == "Task3"}
    assert len(mini.mia_nonmembers) == len(mini.mia_members) == 4
    assert not ids(mini.mia_nonmembers) & (forget | retain | general)


@pytest.mark.parametrize(("attribute", "part", "split"), [
    ("forget", "train", "forget"), ("retain", "train", "retain"), ("general", "validation", "retain"),
])
def test_documents_are_whole(mini: BenchmarkSets, attribute: str, part: str, split: str) -> None:
    source = source_documents(part, split)
    for document in getattr(mini, attribute):
        assert [row.id for row in document.rows] == source[document.id]
        assert all(row.split == split for row in document.rows)


def test_general_has_enough_questions_for_utility(mini: BenchmarkSets) -> None:
    questions = Counter(row.task for row in mini.rows(mini.general) if row.kind == "qa")
    assert all(questions[task] >= 4 for task in TASKS)


def test_draws_are_deterministic_and_disjoint(mini: BenchmarkSets) -> None:
    again = draw_sets(size="mini", seed=0, draw=0)
    tuning = draw_sets(size="mini", seed=0, draw=1)
    for name in ("forget", "retain", "general", "mia_members", "mia_nonmembers"):
        assert [d.id for d in getattr(again, name)] == [d.id for d in getattr(mini, name)]
        assert not ids(getattr(tuning, name)) & ids(getattr(mini, name))
    assert ids(draw_sets(size="mini", seed=1).forget) != ids(mini.forget)


def test_training_rows_are_forget_retain_general(mini: BenchmarkSets) -> None:
    rows = mini.training_rows()
    assert len(rows) == sum(len(mini.rows(documents)) for documents in (mini.forget, mini.retain, mini.general))
    assert len({row.id for row in rows}) == len(rows)


def test_writer_and_manifest(mini: BenchmarkSets, tmp_path: Path) -> None:
    manifest_path = write_sets(mini, tmp_path)
    manifest = json.loads(manifest_path.read_text())
    assert (manifest["preset"]["name"], manifest["seed"], manifest["draw"]) == ("mini", 0, 0)
    assert sorted(manifest["files"]) == sorted(SET_FILES)
    for name, facts in manifest["files"].items():
        assert facts["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    forget = load_records(tmp_path / "forget.jsonl")
    assert [row.id for row in forget] == [row.id for row in mini.rows(mini.forget)]
    assert manifest["files"]["forget.jsonl"]["rows"] == len(forget)
    assert manifest["files"]["forget.jsonl"]["documents"] == [document.id for document in mini.forget]

    members = load_documents(tmp_path / "mia_members.jsonl")
    first_line = json.loads((tmp_path / "mia_members.jsonl").read_text().splitlines()[0])
    assert list(first_line) == ["document"]
    sc_rows = [row for row in mini.rows(mini.mia_members) if row.kind == "sc"]
    assert members == [row.input + " " + row.output for row in sc_rows]
    nonmembers = load_documents(tmp_path / "mia_nonmembers.jsonl")
    assert len(nonmembers) == manifest["files"]["mia_nonmembers.jsonl"]["rows"] == 4


def test_presets_grow_and_full_takes_everything() -> None:
    assert list(PRESETS)[:4] == ["micro", "mini", "bench", "full"]
    full = draw_sets(size="full")
    assert len(full.forget) == len(source_documents("train", "forget"))
    assert len(full.mia_members) == len(full.mia_nonmembers)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"size": "huge"}, "unknown size"),
    ({"size": "mini", "draw": 50}, "too few for draw 50"),
    ({"size": "full", "draw": 1}, "only draw 0"),
    ({"size": "mini", "draw": -1}, "draw must be"),
])
def test_bad_requests_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        draw_sets(**kwargs)


def test_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        draw_sets(tmp_path / "absent")
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="forget"):
        draw_sets(tmp_path)


def test_too_few_general_questions_is_a_user_error(tmp_path: Path) -> None:
    shutil.copytree(bundled_lume_dir(), tmp_path, dirs_exist_ok=True, copy_function=shutil.copyfile)
    retain = tmp_path / "validation" / "retain.jsonl"
    # Keep Task1's sentence completions only: G then has no Task1 question at all.
    kept = [line for line in retain.read_text().splitlines()
            if json.loads(line)["task"] != "Task1" or json.loads(line)["id"].endswith("sc1")]
    retain.write_text("\n".join(kept) + "\n")
    with pytest.raises(UserError, match="0 Task1 questions"):
        draw_sets(tmp_path, size="mini")
