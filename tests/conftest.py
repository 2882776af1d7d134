"""Shared fixtures: a few real LUME rows, a tokenizer trained on them, a micro random Llama, and the
comparison of a two-process run with a one-process run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LUME = Path(__file__).resolve().parents[1] / "src" / "unlearnlm" / "resources" / "lume"
# The command line pins torch's and MKL's kernels (unlearnlm.kernels) in the processes it starts; this
# session's own torch runs unpinned, so its launched commands do too, and compare with it bit for bit.
# tests/test_kernels.py asks for the pin.
os.environ["UNLEARNLM_KERNELS"] = "native"


def read_rows(path: Path, limit: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle)]


@pytest.fixture(scope="session")
def lume_rows() -> dict[str, list[dict]]:
    return {"forget": read_rows(LUME / "train" / "forget.jsonl", 12), "retain": read_rows(LUME / "train" / "retain.jsonl", 24)}


def train_micro_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def micro_tokenizer(lume_rows):
    texts = [row["input"] + " " + row["output"] for rows in lume_rows.values() for row in rows]
    return train_micro_tokenizer(texts)


def make_micro_model(vocab_size: int, arch: str = "llama", seed: int = 0, positions: int = 1024):
    from transformers import AutoModelForCausalLM, LlamaConfig, OlmoConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                  eos_token_id=0, pad_token_id=0, bos_token_id=None)
    config = OlmoConfig(**common) if arch == "olmo" else LlamaConfig(**common)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, micro_tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("micro_model")
    model = make_micro_model(len(micro_tokenizer))
    model.save_pretrained(directory, safe_serialization=True)
    micro_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def micro_data_dir(tmp_path_factory, lume_rows) -> Path:
    directory = tmp_path_factory.mktemp("micro_data")
    for split, rows in lume_rows.items():
        with (directory / f"{split}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return directory


@pytest.fixture(scope="session")
def micro_target(tmp_path_factory) -> tuple[Path, Path]:
    """The micro target, built once per session through the cache: ``(directory, cache root)``."""
    from unlearnlm.bench.target import cached_target

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNLEARNLM_CACHE", str(cache))
        directory, built = cached_target("micro", seed=0)
    assert built
    return directory, cache


@pytest.fixture
def one_process(monkeypatch):
    """This process as the one-process side of a two-process comparison: the same device (the CPU)
    and the same thread count (OMP_NUM_THREADS=1) as each launched process."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_update(two_dir: Path, one_dir: Path, before: dict[str, torch.Tensor]) -> None:
    """Two processes and one reach the same weights, up to the order of their sums.

    The two processes each sum half of the global batch and then add the halves; one process sums
    it whole. Rounding differs by about 1e-7 of each sum, and AdamW divides every gradient by its
    own running scale, so the difference grows with the update, not with the weights: it is bounded
    relative to the largest change training made (measured: about 1e-3 of it on two x86 machines).
    A run that saw other rows or weighed them otherwise differs by a sizeable part of the update.
    """
    after_two, after_one = (load_file(str(directory / "model.safetensors")) for directory in (two_dir, one_dir))
    assert sorted(after_two) == sorted(after_one) == sorted(before)
    update = max((after_one[name] - before[name]).abs().max().item() for name in before)
    assert update > 1e-3  # training moved the weights, so agreeing on them means something
    worst = max((after_two[name] - after_one[name]).abs().max().item() for name in before)
    assert worst <= 1e-2 * update, f"the runs differ by {worst:.2e}, {worst / update:.1%} of the update {update:.2e}"


# --- a local Hugging Face cache, read offline (tests of Hub ids, data set splits, cards) ---------

REPO = "unlearnlm-test/micro-llama"
MAIN_COMMIT = "a" * 40
TAGGED_COMMIT = "b" * 40


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_snapshot(hub: Path, repo_id: str, commit: str, files: Path, refs: tuple[str, ...], kind: str = "models") -> Path:
    """The cache layout huggingface_hub reads offline: ``refs/<name>`` holds a commit, and
    ``snapshots/<commit>/`` the files (the blobs they link to are not needed)."""
    storage = hub / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, micro_model_dir) -> Path:
    """``$HF_HOME`` with REPO at two commits: main, and the tag v1 on another commit."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    hub = home / "hub"
    add_snapshot(hub, REPO, MAIN_COMMIT, micro_model_dir, ("main",))
    add_snapshot(hub, REPO, TAGGED_COMMIT, micro_model_dir, ("v1",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the cache location once, at import: point it here for this process.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def run_cli(*args) -> int:
    """The command line in this process: its exit code."""
    from unlearnlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


def cli_lines(argv: list, capfd) -> tuple[int, list[str]]:
    """The command line in this process: its exit code and its non-blank stderr lines."""
    from unlearnlm.cli import main

    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    return exit_info.value.code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def unlearn_args(model: str, data: Path, out: Path) -> list:
    return ["unlearn", "--model", model, "--forget", data / "forget.jsonl", "--retain", data / "retain.jsonl",
            "--out", out, "--config", "demo", "--set", "optim.max_steps=1", "--set", "max_length=32"]


def kill_when_paused(process: subprocess.Popen, signal_file: Path, timeout: float = 300, kill=None) -> None:
    """SIGKILL a run started with ``UNLEARNLM_TEST_PAUSE_AT`` once it announces its pause in ``signal_file``
    (``kill``: how, when the run is more than its own process)."""
    deadline = time.monotonic() + timeout
    while not signal_file.exists():
        assert process.poll() is None, f"the run ended before pausing: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.2)
    if kill is None:
        process.send_signal(signal.SIGKILL)
    else:
        kill()
    process.wait()
