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


def test_divergence_guard_keeps_the_last_good_state(micro_model_dir, micro_data_dir, tmp_path, monkeypatch):
    from unlearnlm.methods import REGISTRY
    from unlearnlm.methods.gd import gradient_difference_loss as original

    calls = {"n": 0}

    def poisoned(logits, batch, settings, reference=None):
        calls["n"] += 1
        loss, stats = original(logits, batch, settings, reference)
        if calls["n"] >= 9:  # chunk 2 is steps 5..8 with grad_accum 1; this is chunk 3
            return loss * float("nan"), {**stats, "forget_loss": float("nan")}
        return loss, stats

    monkeypatch.setattr(REGISTRY["sugd"], "loss", poisoned)
    report = run(micro_model_dir, micro_data_dir, tmp_path / "out", ["method=sugd"])
    assert report["stopped_reason"].startswith("diverged at step 9: non-finite loss")
    saved = weights(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in saved.values())


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


def test_checkpoint_selection_keeps_the_best_validated_state(micro_model_dir, micro_data_dir, tmp_path):
    forget, retain = micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl"
    validation = [f"validation.forget={forget}", f"validation.retain={retain}", "validation.max_new_tokens=8",
                  "validation.metric=task_aggregate"]
    report = run(micro_model_dir, micro_data_dir, tmp_path / "out", validation)
    rows = [json.loads(line) for line in (tmp_path / "out" / "unlearn_log.jsonl").read_text().splitlines()]
    validations = [row for row in rows if row.get("event") == "validation"]
    assert [row["chunk"] for row in validations] == [1, 2, 3]
    best = max(validations, key=lambda row: row["task_aggregate"])
    assert report["best"]["step"] == best["step"]
    assert report["best"]["task_aggregate"] == best["task_aggregate"]
    assert 0 < report["validation_seconds"] < report["wall_seconds"]
    # The saved model is that state: scoring it again gives the selected score.
    from unlearnlm.data.records import load_records
    from unlearnlm.evaluation.evaluator import quick_scores
    from unlearnlm.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tmp_path / "out")
    rescored = quick_scores(model, tokenizer, load_records(forget), load_records(retain, "retain"), max_new_tokens=8)
    assert rescored["task_aggregate"] == pytest.approx(best["task_aggregate"], abs=1e-9)
    # And it differs from the last state unless the last chunk was the best one.
    run(micro_model_dir, micro_data_dir, tmp_path / "last", [])
    last, selected = weights(tmp_path / "last"), weights(tmp_path / "out")
    same = all(torch.equal(last[name], selected[name]) for name in last)
    assert same == (best["chunk"] == 3)
