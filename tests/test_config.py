import subprocess
import sys

import pytest

from unlearnlm.config import PRESET_DIR, load_config, preset_names
from unlearnlm.errors import UserError


def test_method_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: npo\noptim:\n  lr: 2.0e-5\nschedule:\n  epochs_per_chunk: 3\n")
    config = load_config(str(path), ["optim.lr=5e-5", "method_args.beta=0.2"])
    assert config.method == "npo"
    assert config.optim.lr == 5e-5
    assert config.schedule.epochs_per_chunk == 3
    assert config.schedule.chunk_size is None  # npo's own default: no chunking
    assert config.method_args == {"beta": 0.2}


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"), ("bogus=1", "bogus"), ("method_args.gamma=1", "method_args.gamma"),
    ("schedule.ratio=abc", "schedule.ratio"), ("optim.optimizer_reset=sometimes", "optim.optimizer_reset"),
    ("auto.rate=0", "auto.rate"), ("auto.rate=-1e-4", "auto.rate"), ("auto.rate=.inf", "auto.rate"),
])
def test_bad_keys_and_values_are_named(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_every_preset_loads_and_names_its_source():
    names = preset_names()
    assert {"olmo-7b-sugd", "olmo-7b-sugd-experiments", "olmo-1b-sugd-ours", "olmo-7b-sugd-lora", "demo", "ga", "gd",
            "kl", "npo", "simnpo", "agad"} <= set(names)
    for name in names:
        load_config(f"configs/{name}.yaml")
        header = [line for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
        source = [line for line in header if line.startswith("# Source: ")]
        assert len(source) == 1, name
        assert "iraklis07/llm-unlearning" in source[0] or "ours" in source[0], name


def test_presets_command_shows_each_source():
    result = subprocess.run([sys.executable, "-m", "unlearnlm", "presets"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Source: ") == len(preset_names())
    assert "Source: iraklis07/llm-unlearning, SUGD.ipynb reading configs/sequential_args.json." in result.stdout


# The authors' settings, transcribed from iraklis07/llm-unlearning: configs/sequential_args.json (used by
# SUGD.ipynb and SUGD-Experiments.ipynb), the arguments printed in example-notebooks/Sequential.ipynb, and
# configs/alternating_args.json (AGAD.ipynb). Trainer defaults of every notebook: no weight decay, no
# warmup, gradient clipping at 1.0, one batch per step.
SEQUENTIAL = {"chunk_size": 32, "positive_ratio": 7, "positive_factor": 0.5, "per_device_batch_size": 1,
              "learning_rate": 1e-5, "num_epochs": 7, "torch_dtype": "bfloat16", "apply_lora": False, "k": 8}
LOGGED_LORA = {"chunk_size": 32, "positive_ratio": 3, "positive_factor": 1, "per_device_batch_size": 16,
               "learning_rate": 5e-5, "num_epochs": 4, "torch_dtype": "bfloat16", "apply_lora": True, "lora_r": 16,
               "lora_alpha": 32}


def _common(config):
    assert (config.optim.weight_decay, config.optim.warmup_steps, config.optim.max_grad_norm) == (0, 0, 1.0)
    assert (config.optim.grad_accum, config.optim.optimizer_reset, config.append_eos) == (1, "per_chunk", False)


@pytest.mark.parametrize("preset, outside", [("olmo-7b-sugd", ["embeddings", "final_norm", "lm_head"]),
                                             ("olmo-7b-sugd-experiments", ["final_norm"])])
def test_sugd_7b_presets_are_the_authors_setting(preset, outside):
    config, authors = load_config(f"configs/{preset}.yaml"), SEQUENTIAL
    assert (config.method, config.method_args["retain_weight"]) == ("sugd", authors["positive_factor"])
    assert (config.schedule.chunk_size, config.schedule.ratio, config.schedule.epochs_per_chunk) == (
        authors["chunk_size"], authors["positive_ratio"], authors["num_epochs"])
    assert (config.optim.lr, config.optim.batch_size, config.dtype) == (
        authors["learning_rate"], authors["per_device_batch_size"], authors["torch_dtype"])
    assert config.lora.enabled == authors["apply_lora"]
    assert (config.layers.last_k, config.layers.train_outside) == (authors["k"], outside)
    _common(config)


def test_lora_preset_is_the_authors_logged_run():
    config, authors = load_config("configs/olmo-7b-sugd-lora.yaml"), LOGGED_LORA
    assert (config.method, config.method_args["retain_weight"]) == ("sugd", authors["positive_factor"])
    assert (config.schedule.chunk_size, config.schedule.ratio, config.schedule.epochs_per_chunk) == (
        authors["chunk_size"], authors["positive_ratio"], authors["num_epochs"])
    assert (config.optim.lr, config.optim.batch_size, config.dtype) == (
        authors["learning_rate"], authors["per_device_batch_size"], authors["torch_dtype"])
    assert (config.lora.enabled, config.lora.r, config.lora.alpha, config.lora.dropout) == (True, 16, 32, 0.0)
    assert config.lora.target_modules == ["q_proj", "v_proj", "up_proj", "down_proj"]
    assert config.layers.last_k is None and config.layers.indices is None
    _common(config)


def test_agad_preset_is_the_authors_alternating_args():
    config = load_config("configs/agad.yaml")
    # alternating_args.json: chunk_size 64, interleaving_factor 1, annealing_fraction 0.25, final_annealing
    # true; forgetting and annealing: batch 16, lr 5e-5, 3 epochs; LoRA r 16, alpha 32; bfloat16.
    assert (config.method, config.schedule.chunk_size, config.schedule.epochs_per_chunk) == ("agad", 64, 3)
    assert (config.optim.lr, config.optim.batch_size, config.dtype) == (5e-5, 16, "bfloat16")
    assert config.method_args == {"anneal_every": 1, "anneal_fraction": 0.25, "anneal_epochs": 3, "anneal_lr": 5e-5,
                                  "anneal_batch_size": 16, "final_anneal": True}
    assert (config.lora.enabled, config.lora.r, config.lora.alpha, config.lora.dropout) == (True, 16, 32, 0.0)
    assert config.lora.target_modules == ["q_proj", "v_proj", "up_proj", "down_proj"]
    _common(config)


def test_a_selection_metric_needs_the_sets_it_is_computed_from():
    sets = ["validation.forget=f.jsonl", "validation.retain=r.jsonl"]
    with pytest.raises(UserError, match="validation.members and validation.nonmembers and validation.general"):
        load_config(None, sets)  # the default metric is the final score
    with pytest.raises(UserError, match="'utility' needs validation.general"):
        load_config(None, sets + ["validation.metric=utility"])
    assert load_config(None, sets + ["validation.metric=task_aggregate"]).validation.enabled
    # Logging a trajectory without selecting needs no more than the sets given.
    assert not load_config(None, sets + ["validation.select=false"]).validation.select


@pytest.mark.parametrize("override, key", [("layers.train_outside=[head]", "layers.train_outside"),
                                           ("layers.train_outside=lm_head", "layers.train_outside"),
                                           ("append_eos=maybe", "append_eos")])
def test_new_fidelity_settings_reject_bad_values_by_name(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [override])
