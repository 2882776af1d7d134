import json

import pytest
import torch
from safetensors.torch import load_file

from unlearnlm.config import load_config
from unlearnlm.engine import Engine, unlearn
from unlearnlm.errors import UserError
from unlearnlm.model import apply_trainable, trainable_parameter_names


FAST = ["schedule.chunk_size=4", "schedule.ratio=1", "schedule.epochs_per_chunk=2", "optim.lr=1e-3",
        "optim.batch_size=2", "max_length=48"]


def run(micro_model_dir, micro_data_dir, out, overrides, **kwargs):
    config = load_config(None, FAST + overrides)
    return unlearn(micro_model_dir, micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", out, config,
                   show_progress=False, **kwargs)


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_outputs_log_and_run_json(micro_model_dir, micro_data_dir, tmp_path):
    before = weights(micro_model_dir)
    report = run(micro_model_dir, micro_data_dir, tmp_path / "out", [])
    out = tmp_path / "out"
    assert report["stopped_reason"] == "completed" and report["phases"] == 3
    log = [json.loads(line) for line in (out / "unlearn_log.jsonl").read_text().splitlines()]
    assert {"chunk", "epoch", "step", "seconds"} <= set(log[0])
    assert any("forget_loss" in row for row in log) and any("retain_loss" in row for row in log)
    saved = json.loads((out / "run.json").read_text())
    assert saved["trainable_parameters"] > 0 and len(saved["data"]["forget_sha256"]) == 64
    assert saved["validation_seconds"] == 0
    assert not (out / "state").exists() and not (tmp_path / ".out.partial").exists()
    # The input model is untouched; the output moved.
    after = weights(micro_model_dir)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(not torch.equal(before[name], tensor) for name, tensor in weights(out).items())


def test_refuses_existing_output_and_writing_into_the_input(micro_model_dir, micro_data_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        run(micro_model_dir, micro_data_dir, tmp_path / "taken", [])
    with pytest.raises(UserError, match="overlaps the input"):
        run(micro_model_dir, micro_data_dir, micro_model_dir / "out", [])


@pytest.mark.parametrize("overrides", [
    ["lora.enabled=true", "lora.dropout=0.1", "schedule.shuffle_within_chunk=true"],
    # The cached reference must be the input model's, not the checkpoint's; the AdamW state carries over.
    ["method=kl", "layers.last_k=1", "optim.optimizer_reset=never"],
], ids=["lora-dropout-shuffle", "kl-cached-reference"])
def test_resume_after_a_kill_gives_the_same_model(overrides, micro_model_dir, micro_data_dir, tmp_path, monkeypatch):
    run(micro_model_dir, micro_data_dir, tmp_path / "straight", overrides)

    original_step = Engine._optimizer_step
    calls = {"n": 0}

    def dying_step(self, group):
        calls["n"] += 1
        if calls["n"] == 11:  # in the middle of the second chunk (8 steps per chunk)
            raise KeyboardInterrupt
        return original_step(self, group)

    monkeypatch.setattr(Engine, "_optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(micro_model_dir, micro_data_dir, tmp_path / "killed", overrides)
    monkeypatch.setattr(Engine, "_optimizer_step", original_step)
    with pytest.raises(UserError, match="--resume"):
        run(micro_model_dir, micro_data_dir, tmp_path / "killed", overrides)
    report = run(micro_model_dir, micro_data_dir, tmp_path / "killed", overrides, resume=True)
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    # The log holds each step once, with the same losses as the uninterrupted run.
    assert _steps(tmp_path / "killed") == _steps(tmp_path / "straight")
    assert report["steps"] == json.loads((tmp_path / "straight" / "run.json").read_text())["steps"]


def _steps(out) -> list:
    rows = map(json.loads, (out / "unlearn_log.jsonl").read_text().splitlines())
    return [(row.get("step"), row.get("loss")) for row in rows]


def test_divergence_guard_restores_the_state_saved_before_the_chunk(micro_model_dir, micro_data_dir, tmp_path,
                                                                   monkeypatch, capfd):
    from unlearnlm.cli import main
    from unlearnlm.methods import REGISTRY
    from unlearnlm.methods.gd import gradient_difference_loss as original

    # Chunks are 8 steps (4 forget + 4 retain rows, batches of 2, 2 epochs). The state saved before
    # chunk 2 is the state after step 8: that of a run stopped there.
    run(micro_model_dir, micro_data_dir, tmp_path / "before_chunk_2", ["optim.max_steps=8"])
    calls = {"n": 0}

    def poisoned(logits, batch, settings, reference=None):
        calls["n"] += 1
        loss, stats = original(logits, batch, settings, reference)
        if calls["n"] >= 9:  # the first step of chunk 2, whose NaN update reaches the weights
            return loss * float("nan"), {**stats, "forget_loss": float("nan")}
        return loss, stats

    monkeypatch.setattr(REGISTRY["sugd"], "loss", poisoned)
    paths = ["--model", str(micro_model_dir), "--forget", str(micro_data_dir / "forget.jsonl"),
             "--retain", str(micro_data_dir / "retain.jsonl"), "--out", str(tmp_path / "out")]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["unlearn", *paths, *[arg for setting in FAST for arg in ("--set", setting)]])
    assert exited.value.code == 0
    said = " ".join(capfd.readouterr().err.split())
    assert "diverged at step 9: non-finite loss; kept the state before chunk 2" in said
    assert json.loads((tmp_path / "out" / "run.json").read_text())["stopped_reason"].startswith("diverged at step 9")
    restored, expected = weights(tmp_path / "out"), weights(tmp_path / "before_chunk_2")
    assert all(torch.equal(restored[name], expected[name]) for name in expected)


def test_forget_loss_bound_stops_gradient_ascent(micro_model_dir, micro_data_dir, tmp_path):
    report = run(micro_model_dir, micro_data_dir, tmp_path / "out", ["method=ga", "optim.lr=0.05", "guard.max_forget_loss=7"])
    assert "above max_forget_loss=7" in report["stopped_reason"]


def test_max_steps_budget(micro_model_dir, micro_data_dir, tmp_path):
    report = run(micro_model_dir, micro_data_dir, tmp_path / "out", ["optim.max_steps=3"])
    assert report["steps"] == 3 and report["stopped_reason"] == "max_steps=3 reached"


def test_adapter_only_output_loads_with_peft(micro_model_dir, micro_data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run(micro_model_dir, micro_data_dir, tmp_path / "out", ["lora.enabled=true", "save=adapter", "optim.max_steps=2"])
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    PeftModel.from_pretrained(base, tmp_path / "out")


@pytest.mark.parametrize("method", ["kl", "npo"])
def test_reference_methods_without_lora_use_a_cache_not_a_second_model(method, micro_model_dir, micro_data_dir, tmp_path):
    report = run(micro_model_dir, micro_data_dir, tmp_path / "out", [f"method={method}", "optim.max_steps=2"])
    assert report["steps"] == 2


def test_olmo_7b_preset_trains_exactly_the_last_eight_layers():
    """The real recipe's parameter set, on a random OLMo with the real depth and a tiny width."""
    from transformers import AutoModelForCausalLM, OlmoConfig

    config = load_config("configs/olmo-7b-sugd.yaml")
    olmo = AutoModelForCausalLM.from_config(OlmoConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=32, num_attention_heads=2))
    model = apply_trainable(olmo, config.lora, config.layers)
    layers = {int(name.split(".")[2]) for name in trainable_parameter_names(model)}
    assert layers == set(range(24, 32))
    assert all(name.startswith("model.layers.") for name in trainable_parameter_names(model))


def test_lora_on_selected_layers_only():
    from transformers import AutoModelForCausalLM, OlmoConfig

    config = load_config("configs/olmo-7b-sugd-lora.yaml", ["layers.last_k=2"])
    olmo = AutoModelForCausalLM.from_config(OlmoConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2))
    names = trainable_parameter_names(apply_trainable(olmo, config.lora, config.layers))
    assert names and all("lora_" in name for name in names)
    assert {int(name.split("layers.")[1].split(".")[0]) for name in names} == {4, 5}
    assert {name.split(".")[-4] for name in names} == {"q_proj", "v_proj", "up_proj", "down_proj"}


def test_checkpoint_selection_keeps_the_best_validated_state(micro_target, tmp_path):
    """On the memorized micro target at lr 1e-3 the utility falls chunk after chunk (measured: 1.0,
    0.86, 0.71), so the best state is not the last and keeping the wrong one shows."""
    target = micro_target[0]
    sets = target / "benchmark"
    validation = [f"validation.forget={sets}/forget.jsonl", f"validation.retain={sets}/retain.jsonl",
                  f"validation.general={sets}/general.jsonl", "validation.metric=utility", "validation.max_new_tokens=16"]
    config = load_config(None, FAST + ["optim.lr=1e-3", "max_length=64"] + validation)
    report = unlearn(target, sets / "forget.jsonl", sets / "retain.jsonl", tmp_path / "out", config, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "unlearn_log.jsonl").read_text().splitlines()]
    validations = [row for row in rows if row.get("event") == "validation"]
    assert [row["chunk"] for row in validations] == [1, 2, 3]
    assert len({row["utility"] for row in validations}) > 1  # the scores differ across chunks
    best = max(validations, key=lambda row: row["utility"])
    last = validations[-1]
    assert best["chunk"] != last["chunk"] and best["utility"] > last["utility"]
    assert report["best"]["step"] == best["step"] and report["best"]["utility"] == best["utility"]
    assert 0 < report["validation_seconds"] < report["wall_seconds"]
    # The saved model is the best state: scoring it again gives that state's scores, not the last one's.
    from unlearnlm.data.records import load_records
    from unlearnlm.evaluation.evaluator import quick_scores
    from unlearnlm.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tmp_path / "out")
    rescored = quick_scores(model, tokenizer, load_records(sets / "forget.jsonl"), load_records(sets / "retain.jsonl", "retain"),
                            general=load_records(sets / "general.jsonl", "general"), max_new_tokens=16)
    for metric in ("utility", "forget_mean", "retain_mean"):
        assert rescored[metric] == pytest.approx(best[metric], abs=1e-9), metric
    assert (rescored["utility"], rescored["forget_mean"]) != (last["utility"], last["forget_mean"])
