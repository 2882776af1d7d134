"""The GPU scale benchmark, on its tiny OLMo so that it runs on a CPU in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_scale.py"


@pytest.fixture(scope="module")
def gpu_scale():
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_scale"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_scale"]


def test_real_architectures_have_the_published_sizes(gpu_scale):
    import torch
    from transformers import AutoModelForCausalLM, OlmoConfig

    # allenai/OLMo-1B-0724-hf and OLMo-7B-0724-hf: 1.28B and 6.89B parameters (untied embeddings).
    for arch, expected in (("olmo-1b", 1_279_787_008), ("olmo-7b", 6_888_095_744)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(OlmoConfig(**gpu_scale.ARCHS[arch], tie_word_embeddings=False))
        assert sum(p.numel() for p in model.parameters()) == expected


def test_tiny_run_reports_every_variant(gpu_scale, tmp_path):
    out = tmp_path / "scale.json"
    results = gpu_scale.main(["--arch", "tiny", "--steps", "3", "--variants", "layers+gc", "lora", "--json-out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == results and saved["environment"]["steps"] == 3
    layers, lora = results
    assert (layers["preset"], lora["preset"]) == ("olmo-7b-sugd", "olmo-7b-sugd-lora")
    assert layers["steps"] == lora["steps"] == 3 and layers["timed_steps"] == 1
    # Last 8 of the tiny model's 10 layers train, with the untied embeddings and LM head (1,024 x 64 each)
    # as in the preset's notebook; LoRA trains adapters only, on top of the same model.
    assert layers["trainable_params"] == 8 * (4 * 64 * 64 + 3 * 64 * 128) + 2 * 1024 * 64
    assert 0 < lora["trainable_params"] < layers["trainable_params"] < layers["total_params"] < lora["total_params"]
    assert all(row["tokens_per_s"] > 0 and row["projected_hours"] > 0 for row in results)
    # The 7B preset's schedule on 1,400 forget rows: 44 chunks of (32 forget + 224 retain) x 7 epochs at batch 1.
    assert layers["projected_chunks"] == 44 and layers["steps_per_chunk"] == 256 * 7
    assert lora["steps_per_chunk"] == (128 // 16) * 4
