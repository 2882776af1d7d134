"""Models by Hub id, resolved offline from a local Hugging Face cache built here from the micro model."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MAIN_COMMIT, REPO, TAGGED_COMMIT, file_sha256, run_cli, unlearn_args
from safetensors.torch import load_file


def test_unlearn_and_eval_by_hub_id(hub_cache, micro_data_dir, micro_model_dir, tmp_path):
    out = tmp_path / "unlearned"
    assert run_cli(*unlearn_args(REPO, micro_data_dir, out)) == 0
    run = json.loads((out / "run.json").read_text())
    source = run["model_source"]
    assert (source["repo_id"], source["revision"], source["commit"]) == (REPO, None, MAIN_COMMIT)
    assert source["path"] == str(hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN_COMMIT)
    assert source["weights_sha256"] == {"model.safetensors": file_sha256(micro_model_dir / "model.safetensors")}
    assert run["output_weights_sha256"] == {"model.safetensors": file_sha256(out / "model.safetensors")}
    assert run["output_weights_sha256"] != source["weights_sha256"]  # one step changed the weights

    report = tmp_path / "report"
    assert run_cli("eval", "--model", f"{REPO}@v1", "--forget", micro_data_dir / "forget.jsonl",
                   "--retain", micro_data_dir / "retain.jsonl", "--out", report, "--max-new-tokens", 2) == 0
    results = json.loads((report / "evaluation_results.json").read_text())
    assert results["settings"]["model"] == f"{REPO}@v1"
    assert (results["model_source"]["revision"], results["model_source"]["commit"]) == ("v1", TAGGED_COMMIT)


def test_a_commit_revision_and_a_separate_tokenizer(hub_cache, micro_model_dir, tmp_path):
    from unlearnlm.hub import resolve_model

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(micro_model_dir / name, weights_only)
    source = resolve_model(weights_only, f"{REPO}@{TAGGED_COMMIT}")
    assert source.tokenizer.commit == TAGGED_COMMIT and source.tokenizer_dir.name == TAGGED_COMMIT
    assert source.record()["tokenizer"]["repo_id"] == REPO


@pytest.mark.parametrize("spec", [f"{REPO}@v2", "unlearnlm-test/absent", "./no/such/dir"])
def test_a_model_missing_from_the_cache_is_one_line_and_exit_2(spec, hub_cache, micro_data_dir, tmp_path, capsys):
    code = run_cli(*unlearn_args(spec, micro_data_dir, tmp_path / "out"))
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1 and error.startswith("error: ")
    assert spec.lstrip("./") in error
    assert not (tmp_path / "out").exists()


def test_pickle_only_models_are_refused_before_loading(tmp_path, micro_model_dir):
    from unlearnlm.errors import UserError
    from unlearnlm.hub import resolve_model

    shutil.copy(micro_model_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="no .safetensors"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("base", ["hub id", "relative path"])
def test_an_adapter_evaluates_as_its_merged_model(base, hub_cache, micro_data_dir, micro_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    if base == "relative path":
        shutil.copytree(micro_model_dir, tmp_path / "base")
    spec = REPO if base == "hub id" else "base"
    trained = tmp_path / "trained"
    assert run_cli(*unlearn_args(spec, micro_data_dir, trained), "--set", "lora.enabled=true", "--set", "optim.lr=1e-2",
                   "--save", "adapter") == 0
    # Saved with the base it needs wherever it goes: moved elsewhere, it still finds that base.
    adapter = tmp_path / "elsewhere" / "adapter"
    shutil.move(trained, adapter)
    pinned = json.loads((adapter / "adapter_config.json").read_text())
    expected = (REPO, MAIN_COMMIT) if base == "hub id" else (str(tmp_path / "base"), None)
    assert (pinned["base_model_name_or_path"], pinned["revision"]) == expected

    lora_b = [tensor for name, tensor in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in name]
    assert max(tensor.abs().max().item() for tensor in lora_b) > 0  # the adapter changes the model

    # The merged model, built with peft alone.
    merged = tmp_path / "merged"
    base_dir = micro_model_dir if base == "hub id" else tmp_path / "base"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    model.save_pretrained(merged)
    shutil.copy(micro_model_dir / "tokenizer.json", merged)
    shutil.copy(micro_model_dir / "tokenizer_config.json", merged)

    rows = micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl"
    report = tmp_path / "report"
    assert run_cli("eval", "--model", adapter, "--model", merged, "--forget", rows[0], "--retain", rows[1],
                   "--mia-members", rows[0], "--mia-nonmembers", rows[1], "--out", report, "--max-new-tokens", 4) == 0
    by_adapter, by_merged = (json.loads((report / name / "evaluation_results.json").read_text())
                             for name in ("adapter", "merged"))
    assert by_adapter["model_source"]["base"]["commit"] == (MAIN_COMMIT if base == "hub id" else None)
    generations = [(report / name / "generations.jsonl").read_text() for name in ("adapter", "merged")]
    assert generations[0] == generations[1]
    losses = by_adapter["mia"]["member_losses"] + by_adapter["mia"]["nonmember_losses"]
    assert losses == pytest.approx(by_merged["mia"]["member_losses"] + by_merged["mia"]["nonmember_losses"], abs=1e-6)
    assert by_adapter["aggregated-terms"] == pytest.approx(by_merged["aggregated-terms"], abs=1e-6)
    assert by_adapter["mia_loss_acc"] == pytest.approx(by_merged["mia_loss_acc"], abs=1e-6)
