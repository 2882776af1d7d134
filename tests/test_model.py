"""LoRA's default target modules per model family (model.LORA_TARGETS)."""

import warnings
from types import SimpleNamespace

import pytest

from unlearnlm.config import LayerSettings, LoraSettings
from unlearnlm.errors import UserError
from unlearnlm.model import apply_trainable, count_parameters, lora_target_modules, trainable_parameter_names


def test_a_gpt2_gets_lora_on_its_own_module_names():
    """GPT-2 names: c_attn (H -> 3H, fused q/k/v), attn.c_proj (H -> H), mlp.c_fc (H -> 4H), mlp.c_proj
    (4H -> H). An adapter of rank r on an in -> out map has r * (in + out) weights, so a block has
    r * (4H + 2H + 5H + 5H) = 16 r H."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hidden, rank, blocks = 16, 2, 2
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=hidden, n_layer=blocks, n_head=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_trainable(model, LoraSettings(enabled=True, r=rank, alpha=4), LayerSettings())
    assert count_parameters(model)[0] == blocks * 16 * rank * hidden
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable_parameter_names(model)}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    # GPT-2's Conv1D stores its weight as (in, out): the adapter is told, not corrected with a warning.
    assert model.peft_config["default"].fan_in_fan_out
    assert not [warning for warning in caught if "fan_in_fan_out" in str(warning.message)]


def test_a_llama_keeps_the_authors_modules_and_a_configured_list_wins():
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    assert lora_target_modules(llama, None) == ["q_proj", "v_proj", "up_proj", "down_proj"]
    assert lora_target_modules(llama, ["q_proj"]) == ["q_proj"]


def test_an_unknown_family_asks_for_the_module_names():
    with pytest.raises(UserError, match="no default for model type 'mamba'"):
        lora_target_modules(SimpleNamespace(config=SimpleNamespace(model_type="mamba")), None)
