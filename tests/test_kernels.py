"""Pinned kernels (unlearnlm.kernels): the command line trains the same weights, bit for bit, whatever
instruction sets the environment asks torch and MKL for."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# What two machines' environments may ask for: torch's kernels without vectorization, and MKL on its
# baseline path; against torch's widest kernels, which a CPU without AVX-512 falls back from.
# The test session runs its processes unpinned (conftest.py); these runs ask for the pin.
ASKED = {"plain": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "UNLEARNLM_KERNELS": "pinned"},
         "widest": {"ATEN_CPU_CAPABILITY": "avx512", "UNLEARNLM_KERNELS": "pinned"}}


def unlearned_weights(model: Path, data: Path, out: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "unlearnlm", "unlearn", "--model", str(model), "--forget", str(data / "forget.jsonl"),
               "--retain", str(data / "retain.jsonl"), "--out", str(out), "--config", "demo", "--method", "gd",
               "--set", "optim.max_steps=20", "--set", "max_length=64"]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_pinned_runs_agree_whatever_the_environment_asks(micro_model_dir, micro_data_dir, tmp_path):
    runs = {"plain": ASKED["plain"], "widest": ASKED["widest"],
            # The control: the plain environment left alone picks other kernels than the pin (on any CPU
            # with AVX2), so the agreement above is the pin's doing.
            "plain, native": {**ASKED["plain"], "UNLEARNLM_KERNELS": "native"}}
    processes = {name: unlearned_weights(micro_model_dir, micro_data_dir, tmp_path / str(index), env)
                 for index, (name, env) in enumerate(runs.items())}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {stderr[-2000:]}"
    weights = {name: digest(tmp_path / str(index)) for index, name in enumerate(runs)}
    assert weights["plain"] == weights["widest"]
    assert weights["plain, native"] != weights["plain"]


def test_a_process_running_torch_keeps_its_kernels(monkeypatch):
    from unlearnlm.kernels import pin_kernels

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("UNLEARNLM_KERNELS", raising=False)
    assert "torch" in sys.modules and not pin_kernels()
    assert "ATEN_CPU_CAPABILITY" not in os.environ
