"""Data sets as users hold them: a Hub data set split (offline, from a cache built here), a SemEval
snapshot root with its parquet files under data/, and an MIA directory."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, add_snapshot, file_sha256, run_cli

DATASET = "unlearnlm-test/semeval-like"
DATASET_COMMIT = "c" * 40
# The configs block of a Hub data set's README: how datasets maps split names to files.
README = """---
configs:
- config_name: default
  data_files:
  - split: forget_train
    path: data/forget_train-*
  - split: retain_train
    path: data/retain_train-*
---
"""


@pytest.fixture
def semeval_snapshot(tmp_path, lume_rows) -> Path:
    """The layout of the organizers' data release: parquet under data/, MIA jsonl files in a folder."""
    root = tmp_path / "semeval-snapshot"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(README)
    for split, rows in lume_rows.items():
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}_train-00000-of-00001.parquet")
    (root / "mia").mkdir()
    for name, rows in (("member", lume_rows["forget"]), ("nonmember", lume_rows["retain"])):
        documents = [row["input"] + " " + row["output"] for row in rows if row["id"][-3:-1] == "sc"]
        (root / "mia" / f"{name}.jsonl").write_text("".join(json.dumps({"document": d}) + "\n" for d in documents))
    return root


def test_unlearn_from_a_hub_dataset_split_and_eval_a_snapshot_root(hub_cache, semeval_snapshot, lume_rows, tmp_path):
    snapshot = add_snapshot(hub_cache, DATASET, DATASET_COMMIT, semeval_snapshot, ("main",), kind="datasets")
    out = tmp_path / "unlearned"
    assert run_cli("unlearn", "--model", REPO, "--forget", f"{DATASET}:forget_train", "--retain", f"{DATASET}@main:retain_train",
                   "--out", out, "--config", "demo", "--set", "optim.max_steps=1", "--set", "max_length=32") == 0
    data = json.loads((out / "run.json").read_text())["data"]
    assert (data["forget_rows"], data["retain_rows"]) == (len(lume_rows["forget"]), len(lume_rows["retain"]))
    assert data["forget_sha256"] == file_sha256(snapshot / "data" / "forget_train-00000-of-00001.parquet")

    report = tmp_path / "report"
    mia = semeval_snapshot / "mia"
    assert run_cli("eval", "--model", out, "--forget", semeval_snapshot, "--retain", semeval_snapshot,
                   "--mia-members", mia, "--mia-nonmembers", mia, "--out", report, "--max-new-tokens", 2) == 0
    results = json.loads((report / "evaluation_results.json").read_text())
    assert (results["settings"]["n_forget"], results["settings"]["n_retain"]) == (data["forget_rows"], data["retain_rows"])
    documents = sum(1 for row in lume_rows["forget"] if row["id"][-3:-1] == "sc")
    assert len(results["mia"]["member_losses"]) == documents


@pytest.mark.parametrize("spec, message", [
    (f"{DATASET}:test", "no split 'test'"),
    ("unlearnlm-test/absent:train", "dataset unlearnlm-test/absent: not found in the local Hugging Face cache"),
])
def test_a_bad_dataset_split_is_one_line_and_exit_2(spec, message, hub_cache, semeval_snapshot, micro_model_dir,
                                                     tmp_path, capsys):
    add_snapshot(hub_cache, DATASET, DATASET_COMMIT, semeval_snapshot, ("main",), kind="datasets")
    code = run_cli("eval", "--model", micro_model_dir, "--forget", spec, "--retain", semeval_snapshot,
                   "--out", tmp_path / "out")
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message in error


def test_an_mia_directory_without_its_file_is_refused(tmp_path):
    from unlearnlm.errors import UserError
    from unlearnlm.evaluation.inputs import load_mia_documents

    (tmp_path / "member.jsonl").write_text(json.dumps({"document": "a b c"}) + "\n")
    assert load_mia_documents(tmp_path, "members") == ["a b c"]
    with pytest.raises(UserError, match="nonmember.jsonl: no such file"):
        load_mia_documents(tmp_path, "nonmembers")
