"""The tiny target: the micro preset memorizes, saves a loadable HF directory, and fails loudly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from unlearnlm.data.records import load_documents, load_records
from unlearnlm.errors import UserError
from unlearnlm.target import (
    BENCHMARK_DIR, LOG_NAME, RECIPES, build_target, cached_target, make_model, publish, train_tokenizer,
)


def test_micro_target_memorized_its_sets(micro_target) -> None:
    directory, _ = micro_target
    log = json.loads((directory / LOG_NAME).read_text())
    assert log["rows_recalled"] == log["rows"] and log["answer_token_accuracy"] == 1.0
    assert log["epochs"] <= RECIPES["micro"].max_epochs
    # The evaluator's bar: the 12 per-task means on F and R, and utility.
    assert len(log["final_check"]) == 13
    assert all(value >= 0.9 for value in log["final_check"].values())


def test_saved_directory_loads_and_regenerates_a_forget_answer(micro_target) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = micro_target
    assert list(directory.glob("*.safetensors")) and not list(directory.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    question = next(row for row in load_records(directory / BENCHMARK_DIR / "forget.jsonl") if row.kind == "qa")
    prompt = tokenizer(question.input, return_tensors="pt")["input_ids"]
    generated = model.generate(prompt, do_sample=False, max_new_tokens=64, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
    assert answer.strip() == question.output.strip()


def test_saved_directory_holds_the_sets_it_was_trained_on(micro_target) -> None:
    directory, _ = micro_target
    sets = directory / BENCHMARK_DIR
    manifest = json.loads((sets / "manifest.json").read_text())
    assert (manifest["preset"]["name"], manifest["seed"], manifest["draw"]) == ("micro", 0, 0)
    assert len(load_records(sets / "forget.jsonl")) == manifest["files"]["forget.jsonl"]["rows"]
    assert len(load_documents(sets / "mia_members.jsonl")) == len(load_documents(sets / "mia_nonmembers.jsonl")) == 1


def test_cache_reuses_the_built_target(micro_target, monkeypatch) -> None:
    directory, cache = micro_target
    monkeypatch.setenv("UNLEARNLM_CACHE", str(cache))
    assert cached_target("micro", seed=0) == (directory, False)
    assert directory.parent == cache / "targets" and directory.name.startswith("micro-0-d0-llama-")


def test_a_short_budget_is_a_user_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "target"
    with pytest.raises(UserError, match="did not memorize"):
        build_target(None, out, "micro", max_epochs=1, final_check=None, show_progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_non_empty_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        build_target(None, tmp_path, "micro")
    with pytest.raises(UserError, match="unknown architecture"):
        build_target(None, tmp_path / "new", "micro", arch="gpt2")


def test_publish_replaces_an_old_directory_whole(tmp_path: Path) -> None:
    out, staging = tmp_path / "target", tmp_path / "staging"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish(staging, out)
    assert [path.name for path in out.iterdir()] == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["target"]


def test_olmo_architecture_is_available() -> None:
    tokenizer = train_tokenizer(["a small corpus for a small tokenizer"], vocab_size=300)
    model = make_model("olmo", tokenizer, RECIPES["micro"], seed=0)
    assert type(model).__name__ == "OlmoForCausalLM"
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id


def test_cli_bad_data_dir_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    from unlearnlm.cli import main

    monkeypatch.setattr(sys, "argv", ["unlearnlm", "target", "--data", str(tmp_path / "absent"),
                                      "--out", str(tmp_path / "out"), "--size", "micro"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "absent" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
