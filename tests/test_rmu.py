"""RMU (methods/rmu.py): the loss by hand, the layers the engine supplies, and a command-line run."""

import json
import subprocess
import sys

import pytest
import torch

from unlearnlm.config import load_config
from unlearnlm.data.records import load_records
from unlearnlm.engine import Engine
from unlearnlm.errors import UserError
from unlearnlm.methods import get_method
from unlearnlm.methods.base import forward
from unlearnlm.methods.rmu import random_direction
from unlearnlm.model import apply_trainable, load_model_and_tokenizer


def test_the_direction_is_a_seeded_unit_vector_of_non_negative_coordinates():
    u = random_direction(64, seed=3)
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6)  # float32 rounding of a 64-term sum
    assert (u >= 0).all()
    assert torch.equal(u, random_direction(64, seed=3))
    assert not torch.equal(u, random_direction(64, seed=4))


def test_loss_by_hand():
    """Hidden size 2, three positions. Forget row: three real tokens at c*u + (1, 0), c*u + (0, 2) and
    c*u, squared distances averaged over the hidden dimension 1/2, 2 and 0, mean 5/6. Retain row:
    two real tokens at reference + (3, 0) and reference, so 9/2 and 0, mean 9/4; its padding is far
    off and must not count. With alpha 2 the batch loss is (5/6 + 2 * 9/4) / 2 = 8/3."""
    method = get_method("rmu")
    settings = method.build_settings({"steering_coeff": 4.0, "alpha": 2.0, "seed": 7})
    target = 4.0 * random_direction(2, 7)
    reference = torch.randn(2, 3, 2)
    hidden = torch.empty(2, 3, 2)
    hidden[0] = target + torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    hidden[1] = reference[1] + torch.tensor([[3.0, 0.0], [0.0, 0.0], [100.0, -100.0]])
    batch = {"labels": torch.full((2, 3), -100), "is_forget": torch.tensor([True, False]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "hidden": {2: hidden}, "reference_hidden": {2: reference}}
    loss, stats = method.loss(torch.zeros(2, 3, 5), batch, settings, None)
    # float32 sums of a handful of terms of size < 100: well within 1e-5.
    assert loss.item() == pytest.approx(8 / 3, abs=1e-5)
    assert stats["forget_mse"] == pytest.approx(5 / 6, abs=1e-5)
    assert stats["retain_mse"] == pytest.approx(9 / 4, abs=1e-5)


def build_engine(micro_model_dir, micro_data_dir, tmp_path, overrides):
    config = load_config(None, ["method=rmu", "optim.batch_size=3", "max_length=48", *overrides])
    model, tokenizer = load_model_and_tokenizer(micro_model_dir)
    model = apply_trainable(model, config.lora, config.layers)
    forget = load_records(micro_data_dir / "forget.jsonl")
    retain = load_records(micro_data_dir / "retain.jsonl", "retain")
    return Engine(model, tokenizer, forget, retain, config, tmp_path, show_progress=False)


@pytest.mark.parametrize("lora", [False, True])
def test_the_engine_supplies_the_declared_layer_of_the_model_and_of_the_original(
        lora, micro_model_dir, micro_data_dir, tmp_path):
    """The micro model has 2 decoder layers: the default layer is 1. After one step the model's own
    hidden states have moved, while the reference ones are still the input model's (from the cache
    without LoRA, from the adapter-disabled model with it)."""
    lora_settings = ["lora.enabled=true", "lora.target_modules=[q_proj,v_proj]"] if lora else []
    engine = build_engine(micro_model_dir, micro_data_dir, tmp_path, ["optim.lr=1e-2", *lora_settings])
    assert engine.layers == (1,)
    original, _ = load_model_and_tokenizer(micro_model_dir)
    engine._fill_reference_cache()
    items = engine.phases[0].items[:6]
    engine._optimizer_step(engine._local_batches(items, 6))
    [batch] = engine._local_batches(items, 6)
    with torch.no_grad():
        forward(engine.model, batch, engine.layers)
        engine._reference_values(batch)
        expected = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True).hidden_states[1]
    assert set(batch["hidden"]) == set(batch["reference_hidden"]) == {1}
    retain = ~batch["is_forget"]
    real = batch["attention_mask"].bool() & retain[:, None]
    # The cache was computed in other batches (other widths and rows): float32 rounding of the matrix
    # products differs by about 1e-7 of activations whose coordinates are below 1, far below 1e-5;
    # one step at lr 1e-2 moves them by more than 1e-4.
    assert torch.allclose(batch["reference_hidden"][1][real], expected[real], atol=1e-5)
    assert (batch["hidden"][1][real] - expected[real]).abs().max() > 1e-4


def test_a_layer_outside_the_model_is_refused(micro_model_dir, micro_data_dir, tmp_path):
    with pytest.raises(UserError, match="layer 3 is outside"):
        build_engine(micro_model_dir, micro_data_dir, tmp_path, ["method_args.layer=3"])


def test_a_layer_outside_the_model_fails_in_one_line_and_writes_nothing(micro_model_dir, micro_data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unlearnlm", "unlearn", "--model", str(micro_model_dir),
         "--forget", str(micro_data_dir / "forget.jsonl"), "--retain", str(micro_data_dir / "retain.jsonl"),
         "--out", str(tmp_path / "out"), "--set", "method=rmu", "--set", "method_args.layer=9"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "layer 9 is outside" in result.stderr
    assert not any(tmp_path.iterdir())


def forget_distance(model_dir, micro_data_dir, settings) -> float:
    """Mean squared distance of the forget rows' layer-1 activations to c * u, computed directly."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    target = settings.steering_coeff * random_direction(model.config.hidden_size, settings.seed)
    distances = []
    for row in load_records(micro_data_dir / "forget.jsonl"):
        ids = tokenizer(row.input + " " + row.output, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        distances.append((hidden - target).pow(2).mean().item())
    return sum(distances) / len(distances)


def test_unlearn_command_runs_rmu_and_steers_the_forget_activations(micro_model_dir, micro_data_dir, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "unlearnlm", "unlearn", "--model", str(micro_model_dir),
         "--forget", str(micro_data_dir / "forget.jsonl"), "--retain", str(micro_data_dir / "retain.jsonl"),
         "--out", str(out), "--set", "method=rmu", "--set", "optim.lr=1e-2",
         # c well outside the micro model's activation norms (about 1.3), as 400 is for the mini target's (86).
         "--set", "method_args.steering_coeff=20", "--set", "method_args.alpha=10",
         "--set", "schedule.epochs_per_chunk=2", "--set", "max_length=48"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "rmu" and run["stopped_reason"] == "completed"
    settings = get_method("rmu").build_settings(run["config"]["method_args"])
    before, after = (forget_distance(path, micro_data_dir, settings) for path in (micro_model_dir, out))
    assert after < 0.5 * before


def test_the_last_decoder_layer_is_refused_since_hidden_states_hold_the_final_norms_output_there() -> None:
    """transformers' hidden_states[n_layers] follows the final norm: not the output of decoder layer n."""
    rmu = get_method("rmu")
    assert rmu.layers(rmu.build_settings({"layer": 3}), 4) == (3,)
    with pytest.raises(UserError, match="layer 4 is outside the model's hidden states 0..3"):
        rmu.layers(rmu.build_settings({"layer": 4}), 4)
