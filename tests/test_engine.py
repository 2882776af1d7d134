import json

import pytest
import torch
from safetensors.torch import load_file

from unlearnlm.config import load_config
from unlearnlm.engine import Engine
from unlearnlm.errors import UserError
from unlearnlm.model import apply_trainable, count_parameters, trainable_parameter_names
from unlearnlm.recipe import unlearn

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


def _tiny(arch: str, layers: int = 32, tie: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig, OlmoConfig

    dims = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(OlmoConfig(**dims) if arch == "olmo" else LlamaConfig(**dims))


# Counted by hand for vocabulary V=64, width H=16, MLP width I=32: a decoder layer holds q, k, v, o (4 H^2)
# and gate, up, down (3 H I); Llama adds two RMSNorm weights (2 H), OLMo's LayerNorms have no weights.
# Embeddings and LM head are V H each; Llama's final norm is H, OLMo's has none.
V, H, I = 64, 16, 32
LAYER = {"olmo": 4 * H * H + 3 * H * I, "llama": 4 * H * H + 3 * H * I + 2 * H}
FINAL_NORM = {"olmo": 0, "llama": H}


@pytest.mark.parametrize("arch", ["olmo", "llama"])
@pytest.mark.parametrize("outside", [[], ["final_norm"], ["embeddings", "lm_head"], ["embeddings", "final_norm", "lm_head"]])
def test_layer_focus_trains_exactly_the_listed_weights(arch, outside):
    from unlearnlm.config import LayerSettings, LoraSettings

    model = apply_trainable(_tiny(arch, layers=4), LoraSettings(), LayerSettings(last_k=2, train_outside=outside))
    expected = 2 * LAYER[arch] + V * H * (("embeddings" in outside) + ("lm_head" in outside))
    expected += FINAL_NORM[arch] * ("final_norm" in outside)
    assert count_parameters(model)[0] == expected
    names = set(trainable_parameter_names(model))
    outside_names = {"embeddings": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    listed = {outside_names[name] for name in outside if not (arch == "olmo" and name == "final_norm")}
    assert {name for name in names if not name.startswith("model.layers.")} == listed
    assert {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")} == {2, 3}


def test_layer_focus_refuses_half_of_tied_embeddings_and_lora():
    from unlearnlm.config import LayerSettings, LoraSettings

    with pytest.raises(UserError, match="ties its embeddings"):
        apply_trainable(_tiny("llama", layers=2, tie=True), LoraSettings(), LayerSettings(last_k=1, train_outside=["lm_head"]))
    with pytest.raises(UserError, match="train_outside"):
        apply_trainable(_tiny("llama", layers=2), LoraSettings(enabled=True), LayerSettings(last_k=1, train_outside=["lm_head"]))
    with pytest.raises(UserError, match="train_outside"):
        apply_trainable(_tiny("llama", layers=2), LoraSettings(), LayerSettings(train_outside=["lm_head"]))


@pytest.mark.parametrize("preset, outside", [("olmo-7b-sugd", 2 * V * H), ("olmo-7b-sugd-experiments", 0)])
def test_olmo_7b_presets_train_the_last_eight_layers_and_their_notebooks_extras(preset, outside):
    """The real recipes' parameter sets, on a random OLMo with the real depth and a tiny width:
    SUGD.ipynb also trains embeddings and LM head; SUGD-Experiments.ipynb freezes both (OLMo's final
    norm has no weights)."""
    config = load_config(f"configs/{preset}.yaml")
    model = apply_trainable(_tiny("olmo"), config.lora, config.layers)
    layers = {int(name.split(".")[2]) for name in trainable_parameter_names(model) if name.startswith("model.layers.")}
    assert layers == set(range(24, 32))
    assert count_parameters(model)[0] == 8 * LAYER["olmo"] + outside


def test_lora_on_selected_layers_only():
    config = load_config("configs/olmo-7b-sugd-lora.yaml", ["layers.last_k=2"])
    olmo = _tiny("olmo", layers=6)
    names = trainable_parameter_names(apply_trainable(olmo, config.lora, config.layers))
    assert names and all("lora_" in name for name in names)
    assert {int(name.split("layers.")[1].split(".")[0]) for name in names} == {4, 5}
    assert {name.split(".")[-4] for name in names} == {"q_proj", "v_proj", "up_proj", "down_proj"}


def test_checkpoint_selection_keeps_the_best_validated_state(micro_target, tmp_path):
    """On the memorized micro target at lr 3e-3 the utility falls after the first chunk (measured:
    0.86, 0.29, 0.29), so the best state is not the last and keeping the wrong one shows."""
    target = micro_target[0]
    sets = target / "benchmark"
    validation = [f"validation.forget={sets}/forget.jsonl", f"validation.retain={sets}/retain.jsonl",
                  f"validation.general={sets}/general.jsonl", "validation.metric=utility", "validation.max_new_tokens=16"]
    config = load_config(None, FAST + ["optim.lr=3e-3", "max_length=64"] + validation)
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


@pytest.mark.parametrize("reset_per_chunk", [True, False])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_factors_follow_the_transformers_linear_schedule(reset_per_chunk, warmup):
    from transformers import get_linear_schedule_with_warmup

    from unlearnlm.data.schedule import FORGET, Item, Phase, lr_factors

    phases = [Phase(f"chunk {n}", n, [Item(FORGET, i) for i in range(size)], epochs=2) for n, size in enumerate((5, 3))]
    per_epoch = [5, 3]  # batch size 1
    spans = [10, 6] if reset_per_chunk else [16]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    expected = []
    for span in spans:
        schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=span)
        expected += [schedule.lr_lambdas[0](step) for step in range(span)]
    assert lr_factors(phases, per_epoch, warmup, reset_per_chunk, base_lr=1e-4) == pytest.approx(expected, abs=1e-12)
    # A phase's own learning rate scales its steps only.
    phases[1].lr = 3e-4
    scaled = lr_factors(phases, per_epoch, warmup, reset_per_chunk, base_lr=1e-4)
    assert scaled[:10] == pytest.approx(expected[:10], abs=1e-12)
    assert scaled[10:] == pytest.approx([3 * value for value in expected[10:]], abs=1e-12)


def test_kl_of_the_unchanged_model_is_zero(micro_model_dir, micro_data_dir, tmp_path):
    """The cached reference is the input model itself: before any step the KL term is 0."""
    from unlearnlm.data.records import load_records
    from unlearnlm.methods.kl import kl_loss
    from unlearnlm.model import load_model_and_tokenizer

    config = load_config(None, ["method=kl", "optim.batch_size=3"])
    model, tokenizer = load_model_and_tokenizer(micro_model_dir)
    retain = load_records(micro_data_dir / "retain.jsonl", "retain")
    engine = Engine(model, tokenizer, load_records(micro_data_dir / "forget.jsonl"), retain, config, tmp_path,
                    show_progress=False)
    engine._fill_reference_cache()
    engine.model.train()
    retain_items = [item for item in engine.phases[0].items if item.role == "retain"]
    for batch in engine._local_batches(retain_items, 3):
        with torch.no_grad():
            logits = engine.model(**engine._model_inputs(batch)).logits
            loss, stats = kl_loss(logits, batch, engine.settings, engine._reference_values(batch))
        assert abs(loss.item()) < 1e-6 and abs(stats["retain_kl"]) < 1e-6


@pytest.mark.parametrize("append_eos", [False, True])
def test_unlearning_rows_follow_append_eos(append_eos, micro_model_dir, micro_data_dir, tmp_path):
    from unlearnlm.data.records import load_records
    from unlearnlm.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(micro_model_dir)
    forget = load_records(micro_data_dir / "forget.jsonl")
    retain = load_records(micro_data_dir / "retain.jsonl", "retain")
    config = load_config(None, [f"append_eos={str(append_eos).lower()}"])
    engine = Engine(model, tokenizer, forget, retain, config, tmp_path, show_progress=False)
    for role, records in (("forget", forget), ("retain", retain)):
        for record, example in zip(records, engine.examples[role]):
            answer = tokenizer(" " + record.output, add_special_tokens=False)["input_ids"]
            answer += [tokenizer.eos_token_id] if append_eos else []
            assert [label for label in example.labels if label != -100] == answer


def test_agad_phases_run_with_their_own_batch_size_and_learning_rate(micro_model_dir, micro_data_dir, tmp_path):
    """12 forget rows in chunks of 5 (5, 5, 2), forget batch 2: 3, 3 and 1 steps; two anneals on
    int(24 x 0.5) = 12 retain rows at batch 4: 3 steps each; the final anneal, 24 rows: 6 steps."""
    run(micro_model_dir, micro_data_dir, tmp_path / "out", [
        "method=agad", "schedule.chunk_size=5", "schedule.epochs_per_chunk=1", "method_args.anneal_fraction=0.5",
        "method_args.anneal_epochs=1", "method_args.anneal_batch_size=4", "method_args.anneal_lr=2e-3"])
    rows = map(json.loads, (tmp_path / "out" / "unlearn_log.jsonl").read_text().splitlines())
    steps = [row for row in rows if "step" in row and "phase" in row and "event" not in row]
    phases = [row["phase"] for row in steps]
    assert [(name, phases.count(name)) for name in dict.fromkeys(phases)] == [
        ("forget chunk 1", 3), ("anneal after chunk 1", 3), ("forget chunk 2", 3), ("anneal after chunk 2", 3),
        ("forget chunk 3", 1), ("final anneal", 6)]
    # The logged lr is the one for the next step: in a 3-step anneal at 2e-3, after step 1 it is 2e-3 x 2/3.
    first_anneal = phases.index("anneal after chunk 1")
    assert steps[first_anneal]["lr"] == pytest.approx(2e-3 * 2 / 3, rel=1e-9)
    assert steps[0]["lr"] == pytest.approx(1e-3 * 2 / 3, rel=1e-9)


def test_forget_whole_documents_trains_on_the_whole_text_of_sentence_completions(micro_model_dir, micro_data_dir, tmp_path):
    from unlearnlm.data.records import load_records
    from unlearnlm.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(micro_model_dir)
    forget = load_records(micro_data_dir / "forget.jsonl")
    retain = load_records(micro_data_dir / "retain.jsonl", "retain")
    engine = Engine(model, tokenizer, forget, retain, load_config(None, ["forget_whole_documents=true"]), tmp_path,
                    show_progress=False)
    assert any(record.kind == "sc" for record in forget)
    for record, example in zip(forget, engine.examples["forget"]):
        text = record.input + " " + record.output
        first, rest = text.split(" ", 1) if record.kind == "sc" else (record.input, record.output)
        answer = tokenizer(" " + rest, add_special_tokens=False)["input_ids"]
        assert [label for label in example.labels if label != -100] == answer
        assert example.input_ids[: len(example.input_ids) - len(answer)] == tokenizer(first)["input_ids"]
    for record, example in zip(retain, engine.examples["retain"]):  # retain rows keep their prompt
        answer = tokenizer(" " + record.output, add_special_tokens=False)["input_ids"]
        assert [label for label in example.labels if label != -100] == answer
