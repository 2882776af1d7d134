"""The tiny benchmark's pretrained base: a small Llama (or OLMo) with a byte-level BPE tokenizer,
trained from random initialization for a fixed budget on the pool P (``data.sets.pretraining_pool``).

It learns the language and the kinds of documents, not their answers. P does not depend on the draw,
so one base serves every draw and seed of a data directory (``cached_base``); the base of the bundled
data ships inside the package (``resources/base``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from unlearnlm import __version__
from unlearnlm.bench.fitting import Schedule, fit, progress_bar, text_example, torch_threads, training_text
from unlearnlm.bench.sizes import BaseRecipe, Size, get_size
from unlearnlm.data.records import Record, content_sha256, load_records
from unlearnlm.data.sets import bundled_lume_dir, pool_texts, pretraining_pool
from unlearnlm.errors import UserError
from unlearnlm.model import default_device
from unlearnlm.paths import check_output_dir, replace_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
BASE_LOG = "base.json"
ARCHS = ("llama", "olmo")
# The prompts of the evaluation plus 256 generated tokens stay far below this (RoPE has no weights).
MAX_POSITIONS = 2048
# One thread by default: on two idle cores a second thread made a training step 1.1-1.8x faster,
# but on a machine shared with other jobs the two threads wait on each other and a step was 7-13x
# slower. ``threads=2`` (``--threads 2``) is for a machine known to be idle.
CPU_THREADS = 1
# One pretrained model per data directory and shape, whatever the draw, as SemEval had one OLMo.
BASE_SEED = 0
# Part of the cache keys: bump it when the draw or the training changes in a way a recipe does not show.
TARGET_FORMAT = 2
SHIPPED_BASES = Path(__file__).resolve().parents[1] / "resources" / "base"
Arch = Literal["llama", "olmo"]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, no BOS), EOS = pad = ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        # Every byte stays encodable, so text the base never saw (the synthetic documents) still tokenizes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=MAX_POSITIONS,
    )


def make_model(arch: Arch, tokenizer: PreTrainedTokenizerFast, recipe: BaseRecipe, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, OlmoConfig

    config_class = {"llama": LlamaConfig, "olmo": OlmoConfig}[arch]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def data_fingerprint(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for part in ("train", "validation"):
        for split in ("forget", "retain"):
            digest.update((data_dir / part / f"{split}.jsonl").read_bytes())
    return digest.hexdigest()


def all_rows(data_dir: Path) -> list[Record]:
    return [row for part in ("train", "validation") for split in ("forget", "retain")
            for row in load_records(data_dir / part, split)]


def base_key(recipe: BaseRecipe, arch: Arch, data_dir: Path) -> str:
    """Changes whenever anything that shapes the base changes, so a stale base is never reused."""
    facts = {"format": TARGET_FORMAT, "recipe": asdict(recipe), "arch": arch, "seed": BASE_SEED,
             "data": data_fingerprint(data_dir)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def train_base(
    data_dir: Path, recipe: BaseRecipe, arch: Arch, show_progress: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """``(model, tokenizer, log)``: a tokenizer and a model trained on P for ``recipe.epochs`` epochs."""
    texts = pool_texts(pretraining_pool(data_dir))
    # A real base's tokenizer, with tens of thousands of merges learned on the web, cuts any English
    # text, invented names included, into few tokens. A vocabulary of 2,048 learned on P alone cut the
    # synthetic Task1 and Task2 documents so finely that the target could not memorize them in budget,
    # so the tokenizer learns from every row of the data directory. It holds merges, not answers.
    tokenizer = train_tokenizer([training_text(row) for row in all_rows(data_dir)], recipe.vocab_size)
    model = make_model(arch, tokenizer, recipe, BASE_SEED).to(default_device())
    examples = [text_example(tokenizer, text) for text in texts]
    batches = -(-len(examples) // recipe.batch_size)
    schedule = Schedule(recipe.lr, recipe.batch_size, recipe.warmup_steps, recipe.epochs * batches,
                        recipe.max_grad_norm, recipe.epochs)
    started = time.perf_counter()
    with progress_bar(show_progress, "base") as progress:
        log = fit(model, lambda epoch: examples, tokenizer.pad_token_id, schedule, BASE_SEED, progress=progress)
    log.update(train_seconds=time.perf_counter() - started, pool_documents=len(pretraining_pool(data_dir)),
               pool_texts=len(texts), pool_tokens=sum(len(example.input_ids) for example in examples))
    return model, tokenizer, log


def save_model_dir(directory: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """The model (safetensors) and tokenizer in Hugging Face format."""
    from transformers.utils import logging as hf_logging

    # transformers draws its own bar for the one shard; ours already shows the build.
    bar_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bar_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)


def build_base(
    data_dir: str | Path | None, out_dir: str | Path, size: str | Size = "mini", arch: Arch = "llama",
    overwrite: bool = False, show_progress: bool = True, threads: int = CPU_THREADS, shipped: bool = False,
) -> dict:
    """Pretrain the base of ``size`` on P of ``data_dir`` (``None``: the bundled copy) into ``out_dir``.

    ``shipped`` stores the weights in bfloat16, half the bytes, for the copy inside the package.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    recipe = get_size(size).recipe.base
    root = Path(data_dir) if data_dir is not None else bundled_lume_dir()
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected a LUME-format directory with train/ and validation/)")
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads):
        model, tokenizer, log = train_base(root, recipe, arch, show_progress)
    log.update(recipe=asdict(recipe), arch=arch, seed=BASE_SEED, key=base_key(recipe, arch, root),
               data_sha256=data_fingerprint(root), unlearnlm_version=__version__, torch_threads=threads,
               parameters=sum(parameter.numel() for parameter in model.parameters()), device=str(default_device()))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        save_model_dir(staging, model.to(torch.bfloat16) if shipped else model, tokenizer)
        log["weights_sha256"] = content_sha256(staging / "model.safetensors")
        (staging / BASE_LOG).write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return log


def shipped_base(recipe: BaseRecipe, arch: Arch, data_dir: Path) -> Path | None:
    """The base inside the package, when it is the one these settings would build."""
    directory = SHIPPED_BASES / recipe.name
    log_path = directory / BASE_LOG
    if not log_path.is_file():
        return None
    log = json.loads(log_path.read_text())
    return directory if log["key"] == base_key(recipe, arch, data_dir) else None


def cached_base(data_dir: Path, size: Size, arch: Arch, show_progress: bool = True,
                threads: int = CPU_THREADS) -> tuple[Path, bool]:
    """``(directory, built)``: the base for this data and size, shipped, cached, or built now."""
    recipe = size.recipe.base
    shipped = shipped_base(recipe, arch, data_dir)
    if shipped is not None:
        return shipped, False
    directory = cache_root() / "bases" / f"{recipe.name}-{arch}-{base_key(recipe, arch, data_dir)}"
    if (directory / BASE_LOG).is_file():
        return directory, False
    # Builds are published whole, so a directory without the log was not made here: replace it.
    build_base(data_dir, directory, size, arch, overwrite=True, show_progress=show_progress, threads=threads)
    return directory, True


def load_base(directory: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(default_device())
    return model, AutoTokenizer.from_pretrained(directory)


def cache_root() -> Path:
    configured = os.environ.get("UNLEARNLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "unlearnlm"
