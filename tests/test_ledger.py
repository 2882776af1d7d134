"""The deletion ledger: receipts chained by sha256, ``verify`` failing on the first mismatch, the
lock, and a kill during ``add``."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from safetensors.torch import load_file, save_file

ADD_SETTINGS = ["--config", "demo", "--set", "optim.max_steps=1", "--set", "max_length=32"]
AUTO_SETTINGS = ["--set", "max_length=32"]  # --config auto, the default


def split_by_document(rows: list[dict], parts: int) -> list[list[dict]]:
    documents = sorted({row["id"][:-3] for row in rows})
    return [[row for row in rows if documents.index(row["id"][:-3]) % parts == part] for part in range(parts)]


@pytest.fixture(scope="module")
def ledger_inputs(tmp_path_factory, micro_data_dir, lume_rows) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("ledger_inputs")
    files = {}
    for index, rows in enumerate(split_by_document(lume_rows["forget"], 2), start=1):
        files[f"forget{index}"] = directory / f"forget{index}.jsonl"
        files[f"forget{index}"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    files["unseen"] = directory / "unseen.jsonl"
    files["unseen"].write_text("".join(json.dumps({"text": text}) + "\n" for text in (
        "Mara Velt repaired clocks in a harbour town and kept a logbook of every tide.",
        "The orchard cooperative of Lenhill sold pears to three counties before the war.",
        "A ferry called the Grey Heron crossed the estuary twice a day until its engine failed in winter.",
        "Tomas Brenner taught geometry at a village school and painted lighthouses on weekends.")))
    files["retain"] = micro_data_dir / "retain.jsonl"
    return files


def init_args(model: Path, inputs: dict[str, Path], out: Path) -> list:
    return ["ledger", "init", "--model", model, "--retain", inputs["retain"], "--unseen", inputs["unseen"],
            "--out", out, "--max-new-tokens", "8", "--batch-size", "8"]


@pytest.fixture(scope="module")
def two_requests(tmp_path_factory, micro_model_dir, ledger_inputs) -> Path:
    """A ledger with two requests, made through the command line once, both with the default,
    ``--config auto`` (calibrated with the ledger's unseen documents): the first probes the rate, the
    second reuses it; tests work on copies."""
    ledger = tmp_path_factory.mktemp("ledger") / "L"
    assert run_cli(*init_args(micro_model_dir, ledger_inputs, ledger)) == 0
    for name in ("forget1", "forget2"):
        assert run_cli("ledger", "add", ledger, "--forget", ledger_inputs[name], *AUTO_SETTINGS) == 0
    return ledger


@pytest.fixture
def ledger(two_requests, tmp_path) -> Path:
    copy = tmp_path / "L"
    shutil.copytree(two_requests, copy)
    return copy


def receipt(ledger: Path, number: int) -> dict:
    return json.loads((ledger / "requests" / f"{number:04d}" / "receipt.json").read_text())


def verify_failure(ledger: Path, capsys) -> str:
    capsys.readouterr()
    assert run_cli("ledger", "verify", ledger) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_verify_passes_on_an_untouched_ledger_and_the_receipts_chain(ledger, micro_model_dir, ledger_inputs, capsys):
    from unlearnlm.data.records import content_sha256
    from unlearnlm.hub import weights_sha256

    capsys.readouterr()
    assert run_cli("ledger", "verify", ledger) == 0
    assert capsys.readouterr().out.startswith("ok: 2 requests")
    first, second = receipt(ledger, 1), receipt(ledger, 2)
    assert first["previous_receipt_sha256"] == content_sha256(ledger / "ledger.json")
    assert second["previous_receipt_sha256"] == content_sha256(ledger / "requests" / "0001" / "receipt.json")
    # The weights before the first request are the original's, untouched; each request starts where the last ended.
    assert first["weights_sha256"]["before"] == weights_sha256(micro_model_dir)
    assert second["weights_sha256"]["before"] == first["weights_sha256"]["after"] != first["weights_sha256"]["before"]
    assert second["weights_sha256"]["after"] == weights_sha256(ledger / "requests" / "0002" / "model")
    assert second["unlearning"]["call_seconds"] >= second["unlearning"]["wall_seconds"] > 0
    # Only the current model is stored; the forget sets are referenced, never copied, and redacted.
    assert not (ledger / "requests" / "0001" / "model").exists()
    assert first["forget"]["sha256"] == content_sha256(ledger_inputs["forget1"])
    assert first["forget"]["rows"] == len(ledger_inputs["forget1"].read_text().splitlines())
    stored = "".join(path.read_text(errors="ignore") for path in ledger.rglob("*.json*"))
    first_answer = json.loads(ledger_inputs["forget1"].read_text().splitlines()[0])["output"]
    assert first_answer not in stored


def test_a_self_calibrating_request_puts_its_verdict_in_the_receipt(ledger):
    second = receipt(ledger, 2)
    assert second["settings"]["config"] == "auto" and second["settings"]["resolved"]["auto"]["enabled"]
    assert isinstance(second["verdict"]["forgotten"], bool)
    assert second["verdict"]["summary"] in (ledger / "requests" / "0002" / "receipt.md").read_text()


def run_record(ledger: Path, number: int) -> dict:
    """The unlearning's ``run.json``, beside the model the request made (only the current one is kept)."""
    return json.loads((ledger / "requests" / f"{number:04d}" / "model" / "run.json").read_text())


def rows_in(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_the_second_request_reuses_the_rate_the_first_probed_and_settles_and_checks_its_rows(ledger, ledger_inputs):
    from unlearnlm.data.raw import read_rows
    from unlearnlm.evaluation.inputs import documents_from_rows

    first, second, run = receipt(ledger, 1), receipt(ledger, 2), run_record(ledger, 2)
    assert first["calibration"]["source"] == "probed" and first["calibration"]["probes"] >= 3
    assert first["settling"] == {"earlier_requests": [], "skipped": [], "forget_rows": rows_in(ledger_inputs["forget1"]),
                                 "checked_forget_documents": first["settling"]["checked_forget_documents"]}
    # No probe ran: the run trained at request 1's rate, given to it.
    assert run["auto"]["probes"] == [] and run["auto"]["lr_source"] == "given"
    assert run["auto"]["lr"] == run["config"]["optim"]["lr"] == run["config"]["auto"]["rate"] == first["calibration"]["lr"]
    assert second["calibration"] == {"lr": first["calibration"]["lr"], "source": "request 1", "probes": 0,
                                     "probe_seconds": 0}
    # The settling pass trained request 2's rows and request 1's; the check read both sets' documents.
    assert second["settling"]["earlier_requests"] == [1] and second["settling"]["skipped"] == []
    assert run["auto"]["settle_forget_rows"] == rows_in(ledger_inputs["forget1"]) + rows_in(ledger_inputs["forget2"])
    documents = [len(documents_from_rows(read_rows(ledger_inputs[name]).records)) for name in ("forget1", "forget2")]
    assert run["auto"]["earlier_forget_documents"] == documents[0]
    assert run["auto"]["forget_documents"] == sum(documents) == second["settling"]["checked_forget_documents"]
    assert "rate" in (ledger / "requests" / "0002" / "receipt.md").read_text()


def test_a_later_receipt_rescores_every_earlier_request_and_records_drift_and_the_light_audit(ledger):
    second = receipt(ledger, 2)
    [earlier] = second["earlier_requests"]
    assert earlier["request"] == 1 and earlier["forget_sha256"] == receipt(ledger, 1)["forget"]["sha256"]
    assert 0 <= earlier["forget_score"] <= 1
    assert earlier["right_after_own_request"] == receipt(ledger, 1)["scores"]["own"]
    then, now = earlier["right_after_own_request"]["forget_terms"], earlier["forget_terms"]
    assert earlier["largest_term_change"] == pytest.approx(max(abs(now[label] - then[label]) for label in now))
    assert earlier["came_back"] == pytest.approx(max(then[label] - now[label] for label in now))
    drift = second["drift"]["retain_score"]
    assert drift["change"] == pytest.approx(drift["now"] - drift["original"])
    attacks = {attack["attack"] for attack in second["audit"]["attacks"]}
    assert {"none", "sampled", "prompt-cut", "context", "extraction-any"} <= attacks


def test_an_earlier_forget_set_its_owner_deleted_is_unavailable_and_skipped_and_recalibrate_probes_again(
        ledger, ledger_inputs, tmp_path):
    import unlearnlm.ledger

    moved = tmp_path / "forget1.jsonl"
    shutil.copy(ledger_inputs["forget1"], moved)
    (ledger / "requests" / "0001" / "forget_reference.json").write_text(json.dumps({"forget": str(tmp_path / "gone")}))
    third = unlearnlm.ledger.add(ledger, moved, overrides=["max_length=32"], recalibrate=True)
    assert unlearnlm.ledger.show(ledger)[-1] == third
    unavailable, available = third["earlier_requests"]
    assert "unavailable" in unavailable and "forget_score" not in unavailable
    assert "forget_score" in available
    assert unlearnlm.ledger.verify(ledger)["requests"] == 3  # the locator is outside the chain
    # --recalibrate: probed again; request 1 is skipped by the settling pass and named, request 2 is in it.
    run = run_record(ledger, 3)
    assert third["calibration"]["source"] == "probed" and run["auto"]["lr_source"] == "probed"
    assert len(run["auto"]["probes"]) == third["calibration"]["probes"] >= 3
    assert third["settling"]["earlier_requests"] == [2] and third["settling"]["skipped"] == [1]
    assert run["auto"]["settle_forget_rows"] == rows_in(moved) + rows_in(ledger_inputs["forget2"])
    assert "skipped (unavailable): 1" in (ledger / "requests" / "0003" / "receipt.md").read_text()


@pytest.mark.parametrize("number", [1, 2])  # the last receipt has no later one chained to it
def test_verify_fails_on_an_edited_receipt(number, ledger, capsys):
    path = ledger / "requests" / f"{number:04d}" / "receipt.json"
    edited = json.loads(path.read_text())
    edited["forget"]["rows"] += 1
    path.write_text(json.dumps(edited, indent=2) + "\n")
    assert f"{number:04d}/receipt.json" in verify_failure(ledger, capsys)


def test_verify_fails_on_a_removed_request(ledger, capsys):
    shutil.rmtree(ledger / "requests" / "0001")
    assert "request 1 is missing" in verify_failure(ledger, capsys)


def test_verify_fails_when_the_last_request_is_removed(ledger, capsys):
    shutil.rmtree(ledger / "requests" / "0002")
    assert "0001/model" in verify_failure(ledger, capsys)  # the model it made was removed when request 2 came


def test_verify_fails_on_replaced_current_weights(ledger, capsys):
    weights = ledger / "requests" / "0002" / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert "model.safetensors" in verify_failure(ledger, capsys)


def test_kept_models_stay_and_verify_checks_them(micro_model_dir, ledger_inputs, tmp_path, capsys):
    ledger = tmp_path / "L"
    assert run_cli(*init_args(micro_model_dir, ledger_inputs, ledger), "--keep-models") == 0
    for name in ("forget1", "forget2"):
        assert run_cli("ledger", "add", ledger, "--forget", ledger_inputs[name], *ADD_SETTINGS) == 0
    kept = ledger / "requests" / "0001" / "model"
    assert kept.is_dir() and run_cli("ledger", "verify", ledger) == 0
    (kept / "model.safetensors").write_bytes((ledger / "requests" / "0002" / "model" / "model.safetensors").read_bytes())
    assert "0001/model/model.safetensors" in verify_failure(ledger, capsys)


def test_a_second_writer_is_refused_while_the_lock_is_held(ledger, ledger_inputs, capsys):
    from unlearnlm.paths import lock_path_for

    # flock conflicts between two open files even within one process: this stands for another process.
    descriptor = os.open(lock_path_for(ledger), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert run_cli("ledger", "add", ledger, "--forget", ledger_inputs["forget1"], *ADD_SETTINGS) == 2
        assert "being written by another run" in capsys.readouterr().err
    finally:
        os.close(descriptor)
    assert not (ledger / "requests" / "0003").exists()


def test_show_lists_every_request(ledger, capsys):
    capsys.readouterr()
    assert run_cli("ledger", "show", ledger) == 0
    out = capsys.readouterr().out
    assert receipt(ledger, 1)["forget"]["sha256"][:12] in out and receipt(ledger, 2)["forget"]["sha256"][:12] in out


@pytest.mark.parametrize("case", ["no model", "not a ledger", "missing forget", "unknown setting", "recalibrate a preset",
                                  "recalibrate a given rate"])
def test_bad_input_is_one_line_exit_2(case, ledger, ledger_inputs, tmp_path, capsys):
    args = {"no model": init_args(tmp_path / "absent", ledger_inputs, tmp_path / "new"),
            "not a ledger": ["ledger", "add", tmp_path, "--forget", ledger_inputs["forget1"]],
            "missing forget": ["ledger", "add", ledger, "--forget", tmp_path / "absent.jsonl"],
            "unknown setting": ["ledger", "add", ledger, "--forget", ledger_inputs["forget1"], "--set", "no_such_key=1"],
            "recalibrate a preset": ["ledger", "add", ledger, "--forget", ledger_inputs["forget1"], "--config", "demo",
                                     "--recalibrate"],
            "recalibrate a given rate": ["ledger", "add", ledger, "--forget", ledger_inputs["forget1"], "--set",
                                         "auto.rate=1e-3", "--recalibrate"]}[case]
    capsys.readouterr()
    assert run_cli(*args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists() and not (ledger / ".pending").exists()


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(("case", "message"), [
    ("already a ledger", "already a ledger"),
    ("three unseen documents", "--unseen: 3 documents"),
    ("duplicate unseen documents", "--unseen document 5 repeats document 1"),
    ("unseen shares text with retain", "shares text with the retain set"),
    ("out under a file", "is a file, not a directory"),
])
def test_init_refuses_in_one_line_before_scoring(case, message, ledger, micro_model_dir, ledger_inputs, tmp_path, capsys):
    inputs, out = dict(ledger_inputs), tmp_path / "new"
    documents = [json.loads(line)["text"] for line in ledger_inputs["unseen"].read_text().splitlines()]
    retain = json.loads(ledger_inputs["retain"].read_text().splitlines()[0])
    texts = {"three unseen documents": documents[:3], "duplicate unseen documents": documents + documents[:1],
             "unseen shares text with retain": documents + [retain["input"] + " " + retain["output"]]}.get(case)
    if texts:
        inputs["unseen"] = tmp_path / "unseen.jsonl"
        inputs["unseen"].write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    if case == "already a ledger":
        out = ledger
    elif case == "out under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "L"
    before = (ledger / "ledger.json").read_bytes()
    capsys.readouterr()
    assert run_cli(*init_args(micro_model_dir, inputs, out)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "new").exists() and (ledger / "ledger.json").read_bytes() == before


@pytest.mark.parametrize(("case", "message"), [
    ("ledger.json a list", "ledger.json: not a JSON object (a list)"),
    ("ledger.json without original", "ledger.json: no original"),
    ("receipt a list", "0001/receipt.json: not a JSON object (a list)"),
])
@pytest.mark.parametrize("command", ["verify", "show"])
def test_a_damaged_ledger_file_is_one_line_exit_2(case, message, command, ledger, capsys):
    path = ledger / ("requests/0001/receipt.json" if case == "receipt a list" else "ledger.json")
    value = json.loads(path.read_text())
    value.pop("original", None)
    path.write_text(json.dumps([1] if "list" in case else value))
    capsys.readouterr()
    assert run_cli("ledger", command, ledger) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("stray", ["2", "00003", "0000", "notes.txt", "backup", "requests a file"])
def test_verify_refuses_what_is_not_a_request_directory_in_requests(stray, ledger, capsys):
    if stray == "requests a file":
        shutil.rmtree(ledger / "requests")
        (ledger / "requests").write_text("x")
        expected = "requests: not a directory"
    else:
        (ledger / "requests" / stray).mkdir() if "." not in stray else (ledger / "requests" / stray).write_text("x")
        expected = f"requests/{stray}: not a request directory"
    assert expected in verify_failure(ledger, capsys)


def test_verify_passes_over_hidden_files_in_requests(ledger, capsys):
    """A file manager's .DS_Store, or an editor's swap file, is no request and no tampering."""
    (ledger / "requests" / ".DS_Store").write_text("x")
    assert run_cli("ledger", "verify", ledger) == 0


@pytest.mark.parametrize(("case", "message"), [
    ("the forget set of request 1 again", "the same forget set as request 1"),
    ("forget is the retain set", "the forget and retain sets are the same data"),
    ("forget shares text with U", "shares text with the forget set"),
    ("forget shares text with U, a preset", "shares text with the forget set"),
])
def test_add_refuses_in_one_line_and_writes_nothing(case, message, ledger, ledger_inputs, tmp_path, capsys):
    forget = {"the forget set of request 1 again": tmp_path / "copy.jsonl",
              "forget is the retain set": ledger_inputs["retain"]}.get(case, tmp_path / "unseen_rows.jsonl")
    shutil.copy(ledger_inputs["forget1"], tmp_path / "copy.jsonl")
    (tmp_path / "unseen_rows.jsonl").write_text(ledger_inputs["unseen"].read_text())
    before = sorted(path.relative_to(ledger) for path in ledger.rglob("*"))
    capsys.readouterr()
    assert run_cli("ledger", "add", ledger, "--forget", forget,
                   *(ADD_SETTINGS if case.endswith("a preset") else AUTO_SETTINGS)) == 2
    assert message in one_error_line(capsys)
    assert sorted(path.relative_to(ledger) for path in ledger.rglob("*")) == before  # no .pending


@pytest.mark.slow
def test_a_kill_during_add_leaves_a_ledger_that_verifies_and_the_same_add_finishes(ledger, tmp_path):
    """SIGKILL while the unlearning writes its first checkpoint; the same ``add`` again resumes. The third
    request is raw documents of its own (an earlier request's set again is refused)."""
    pause = tmp_path / "paused"
    env = {**os.environ, "UNLEARNLM_TEST_PAUSE_AT": "written:1", "UNLEARNLM_TEST_PAUSE_FILE": str(pause),
           "OMP_NUM_THREADS": "1"}
    forget = tmp_path / "march.jsonl"
    forget.write_text("".join(json.dumps({"text": text}) + "\n" for text in (
        "Ilse Marrow kept the accounts of a small brewery and wrote letters to her sister every Sunday evening.",
        "The customer record lists a flat on Quay Street, a phone number and two orders of winter tyres.")))
    args = [sys.executable, "-m", "unlearnlm", "ledger", "add", str(ledger), "--forget", str(forget),
            "--config", "demo", "--set", "optim.max_steps=2", "--set", "max_length=32", "--set", "schedule.chunk_size=2"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not pause.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (ledger / ".pending").exists()
    assert run_cli("ledger", "verify", ledger) == 0
    assert sorted(path.name for path in (ledger / "requests").iterdir()) == ["0001", "0002"]
    env.pop("UNLEARNLM_TEST_PAUSE_AT")
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert run_cli("ledger", "verify", ledger) == 0
    assert receipt(ledger, 3)["weights_sha256"]["before"] == receipt(ledger, 2)["weights_sha256"]["after"]
    assert not (ledger / ".pending").exists() and not (ledger / "requests" / "0002" / "model").exists()
