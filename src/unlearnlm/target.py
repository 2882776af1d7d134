"""The tiny benchmark's target: a small transformer trained from scratch until it memorized LUME.

``build_target`` draws the sets (``data.sets``), trains a byte-level BPE tokenizer on the training
text, trains a randomly initialized Llama (or OLMo) on F, R and G until it reproduces them, checks
the benchmark's bar (every per-task mean >= 0.9 on F and R, utility >= 0.9; docs/benchmark.md) and
saves a standard Hugging Face directory with the set files it used (``benchmark/``) and a training
log (``target.json``).

Loss on the whole sequence, prompt included: the SemEval targets were fine-tuned on whole documents,
and the MIA members are whole documents, so the target must have memorized the prompts too or the
attack would only see the answers. Memorization is judged on the answers only (``output`` + EOS),
the part that greedy generation must reproduce.

Stop criterion (cheap and exact): with teacher forcing, the argmax at every answer position equals
the answer token. That is exactly the condition for greedy decoding to reproduce the answer and
stop at its EOS, so one forward pass over the rows replaces generating them. The benchmark's bar is
then checked once with the evaluator, as the benchmark will score the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from unlearnlm import __version__
from unlearnlm.data.records import Record
from unlearnlm.data.sets import BenchmarkSets, SizePreset, bundled_lume_dir, draw_sets, get_preset, write_sets
from unlearnlm.data.tokenize import IGNORE_INDEX, Example, collate, encode_example
from unlearnlm.errors import UserError
from unlearnlm.evaluation.inputs import check_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
BENCHMARK_DIR = "benchmark"
LOG_NAME = "target.json"
MEMORIZED = 0.9  # the benchmark's bar for each per-task mean and for utility
ARCHS = ("llama", "olmo")
# The prompts of the evaluation plus 256 generated tokens stay far below this (RoPE has no weights).
MAX_POSITIONS = 2048
# One thread by default: on two idle cores a second thread made a training step 1.1-1.8x faster
# (mini, small), but on a machine shared with other jobs the two threads wait on each other and a
# step was 7-13x slower. ``threads=2`` (``--threads 2``) is for a machine known to be idle.
CPU_THREADS = 1
# Part of the cache key: bump it when the draw or the training changes in a way a recipe does not show.
TARGET_FORMAT = 1

Arch = Literal["llama", "olmo"]


@dataclass(frozen=True)
class Recipe:
    """Tokenizer, model and optimizer settings of one size, tuned on two CPU cores.

    The learning rate follows a cosine schedule over ``max_epochs`` (after a short warmup), so the
    end of the budget anneals towards exact recall; training stops as soon as every row is recalled.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    lr: float
    batch_size: int
    max_epochs: int
    warmup_epochs: int = 2
    check_every: int = 2
    max_grad_norm: float = 1.0


RECIPES: dict[str, Recipe] = {
    # Measured: micro recalled everything after 40-43 epochs (seeds 0-2), mini after 46 (41-42 with a
    # budget of 70), small after 47 (54 with a budget of 100): a shorter cosine horizon stops sooner,
    # but too short a one stalls (micro: 8 rows short with 40), so the budgets keep 30-50% to spare.
    "micro": Recipe(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                    lr=3e-3, batch_size=4, max_epochs=60),
    "mini": Recipe(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                   lr=3e-3, batch_size=4, max_epochs=100),
    "small": Recipe(vocab_size=4096, hidden_size=192, num_layers=2, num_heads=6, intermediate_size=768,
                    lr=2e-3, batch_size=4, max_epochs=70),
    # Not tuned: every train document is beyond two CPU cores; meant for a GPU.
    "full": Recipe(vocab_size=8192, hidden_size=384, num_layers=4, num_heads=6, intermediate_size=1536,
                   lr=1e-3, batch_size=8, max_epochs=100),
}

# Named scores of a trained target (the 12 per-task means, utility); each must be >= MEMORIZED.
FinalCheck = Callable[[torch.nn.Module, "PreTrainedTokenizerFast", BenchmarkSets], dict[str, float]]


@dataclass
class Memorization:
    rows: int
    rows_recalled: int
    answer_tokens: int
    answer_tokens_recalled: int

    @property
    def complete(self) -> bool:
        return self.rows_recalled == self.rows

    @property
    def token_accuracy(self) -> float:
        return self.answer_tokens_recalled / self.answer_tokens


def training_text(row: Record) -> str:
    return row.input + " " + row.output


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, no BOS), EOS = pad = ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        # Every byte stays encodable, so text the target never saw (nonmembers, new prompts) still tokenizes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=MAX_POSITIONS,
    )


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def make_model(arch: Arch, tokenizer: PreTrainedTokenizerFast, recipe: Recipe, seed: int) -> torch.nn.Module:
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


def length_batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length, so batches carry little padding."""
    order = sorted(range(len(examples)), key=lambda index: len(examples[index].input_ids))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def measure_memorization(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16
) -> Memorization:
    """Teacher-forced greedy recall of the labelled (answer) tokens of every example."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = rows_recalled = tokens = tokens_recalled = 0
    for indices in length_batches(examples, batch_size):
        batch = on_device(collate([examples[index] for index in indices], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE_INDEX
        hits = (logits.argmax(dim=-1) == targets) & scored
        rows += len(indices)
        rows_recalled += int((hits.sum(dim=1) == scored.sum(dim=1)).sum())
        tokens += int(scored.sum())
        tokens_recalled += int(hits.sum())
    model.train(was_training)
    return Memorization(rows, rows_recalled, tokens, tokens_recalled)


def whole_sequence(example: Example) -> Example:
    """The same tokens with a label on every one: the prompt is learned too (see the module docstring)."""
    return replace(example, labels=list(example.input_ids))


def evaluator_check(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, sets: BenchmarkSets
) -> dict[str, float]:
    """The benchmark's bar as the evaluator scores it: the 12 raw per-task means on F and R, utility."""
    from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, run_evaluation
    from unlearnlm.evaluation.scoring import aggregated_terms

    data = EvalData(sets.rows(sets.forget), sets.rows(sets.retain), general=sets.rows(sets.general))
    results = run_evaluation(model, tokenizer, data, EvalSettings(mia_suite=False))
    summaries = {"forget": results["forget-set"], "retain": results["retain-set"]}
    # The aggregate inverts the forget terms; the bar is on what the target recalls, so undo it.
    scores = {
        term.label: 1 - term.value if term.split == "forget" else term.value for term in aggregated_terms(summaries)
    }
    scores["utility"] = results["utility"]
    return scores


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]target[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  recalled {task.fields[recalled]}"), TimeElapsedColumn(),
        disable=not enabled,
    )


def train_until_memorized(
    model: torch.nn.Module, train: Sequence[Example], check: Sequence[Example], pad_id: int,
    recipe: Recipe, seed: int, show_progress: bool,
) -> dict:
    """AdamW on ``train`` until every row of ``check`` is recalled, or ``recipe.max_epochs``."""
    from transformers import get_cosine_schedule_with_warmup

    batches = length_batches(train, recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, recipe.warmup_epochs * len(batches), recipe.max_epochs * len(batches)
    )
    order = random.Random(seed)
    device = next(model.parameters()).device
    model.train()
    memorization, epoch, loss_sum = None, 0, 0.0
    with progress_bar(show_progress) as progress:
        task = progress.add_task("epochs", total=recipe.max_epochs, loss=float("nan"), recalled="-")
        for epoch in range(1, recipe.max_epochs + 1):
            order.shuffle(batches)
            loss_sum = 0.0
            for indices in batches:
                loss = model(**on_device(collate([train[index] for index in indices], pad_id), device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item()
            if epoch % recipe.check_every == 0 or epoch == recipe.max_epochs:
                memorization = measure_memorization(model, check, pad_id)
            recalled = f"{memorization.rows_recalled}/{memorization.rows}" if memorization else "-"
            progress.update(task, advance=1, loss=loss_sum / len(batches), recalled=recalled)
            if memorization is not None and memorization.complete:
                break
    model.eval()
    return {
        "epochs": epoch,
        "final_loss": loss_sum / len(batches),
        "rows": memorization.rows,
        "rows_recalled": memorization.rows_recalled,
        "answer_token_accuracy": memorization.token_accuracy,
    }


def publish(staging: Path, out: Path) -> None:
    """Move the finished directory into place; ``out`` is never seen half-written."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def resolve_recipe(preset: SizePreset, max_epochs: int | None) -> Recipe:
    recipe = RECIPES[preset.name]
    if max_epochs is None:
        return recipe
    if max_epochs < 1:
        raise UserError(f"max_epochs must be >= 1, got {max_epochs}")
    return replace(recipe, max_epochs=max_epochs)


def train_target(
    sets: BenchmarkSets, recipe: Recipe, arch: Arch, seed: int, show_progress: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """``(model, tokenizer, log)``: a new tokenizer and model trained on F, R and G until recalled."""
    rows = sets.training_rows()
    tokenizer = train_tokenizer([training_text(row) for row in rows], recipe.vocab_size)
    model = make_model(arch, tokenizer, recipe, seed).to(default_device())
    # EOS kept: the target must learn where each answer stops, or greedy generation runs on.
    check = [encode_example(tokenizer, row.input, row.output, append_eos=True) for row in rows]
    train = [whole_sequence(example) for example in check]
    log = train_until_memorized(model, train, check, tokenizer.pad_token_id, recipe, seed, show_progress)
    return model, tokenizer, log


def shortfall(log: dict, scores: dict[str, float]) -> list[str]:
    """What falls short of the bar: the scores below it, or, unchecked, any row not recalled."""
    if scores:
        return [f"{name} = {value:.3f}" for name, value in scores.items() if value < MEMORIZED]
    return [] if log["rows_recalled"] == log["rows"] else ["teacher-forced recall"]


def build_target(
    data_dir: str | Path | None,
    out_dir: str | Path,
    size: str = "mini",
    seed: int = 0,
    arch: Arch = "llama",
    draw: int = 0,
    overwrite: bool = False,
    max_epochs: int | None = None,
    final_check: FinalCheck | None = evaluator_check,
    show_progress: bool = True,
    threads: int = CPU_THREADS,
) -> dict:
    """Build a memorized target in ``out_dir``; returns the training log also saved as ``target.json``.

    ``data_dir`` is a LUME-format directory (``None``: the bundled copy). ``max_epochs`` overrides the
    size's budget. ``final_check`` scores the trained target (``None``: the teacher-forced recall
    alone decides). Raises ``UserError`` when the target falls short of the benchmark's bar.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    preset = get_preset(size)
    recipe = resolve_recipe(preset, max_epochs)
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    sets = draw_sets(data_dir, preset, seed, draw)

    with torch_threads(threads):
        started = time.perf_counter()
        model, tokenizer, log = train_target(sets, recipe, arch, seed, show_progress)
        trained = time.perf_counter()
        scores = final_check(model, tokenizer, sets) if final_check is not None else {}
    log.update(
        train_seconds=trained - started, check_seconds=time.perf_counter() - trained, final_check=scores,
        unlearnlm_version=__version__, preset=asdict(preset), recipe=asdict(recipe), arch=arch, seed=seed,
        draw=draw, parameters=sum(parameter.numel() for parameter in model.parameters()),
        torch_threads=threads, device=str(default_device()),
    )
    failures = shortfall(log, scores)
    if failures:
        raise UserError(
            f"the {preset.name} target did not memorize its sets in {log['epochs']} epochs "
            f"({log['rows_recalled']}/{log['rows']} rows recalled; below {MEMORIZED}: {', '.join(failures)}); "
            "raise the epoch budget"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        save_target(staging, model, tokenizer, sets, log)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return log


def save_target(
    directory: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, sets: BenchmarkSets, log: dict
) -> None:
    """The model (safetensors) and tokenizer in Hugging Face format, the set files, the training log."""
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
    write_sets(sets, directory / BENCHMARK_DIR)
    (directory / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")


def data_fingerprint(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for part in ("train", "validation"):
        for split in ("forget", "retain"):
            digest.update((data_dir / part / f"{split}.jsonl").read_bytes())
    return digest.hexdigest()


def cache_root() -> Path:
    configured = os.environ.get("UNLEARNLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "unlearnlm"


def cache_key(preset: SizePreset, recipe: Recipe, arch: Arch, data_dir: Path) -> str:
    """Changes whenever anything that shapes the target changes, so a stale target is never reused."""
    facts = {"format": TARGET_FORMAT, "version": __version__, "preset": asdict(preset), "recipe": asdict(recipe),
             "arch": arch, "data": data_fingerprint(data_dir)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cached_target(size: str = "mini", seed: int = 0, draw: int = 0, arch: Arch = "llama") -> tuple[Path, bool]:
    """``(directory, built)``: the bundled-data target of these settings, built on first use.

    It lives in ``<cache>/targets/<size>-<seed>-d<draw>-<arch>-<key>``, where ``<cache>`` is
    ``$UNLEARNLM_CACHE`` or ``~/.cache/unlearnlm`` and ``<key>`` hashes everything that shapes the target.
    """
    preset = get_preset(size)
    data_dir = bundled_lume_dir()
    key = cache_key(preset, RECIPES[preset.name], arch, data_dir)
    target = cache_root() / "targets" / f"{preset.name}-{seed}-d{draw}-{arch}-{key}"
    if (target / LOG_NAME).is_file():
        return target, False
    # Builds are published whole, so a directory without the log was not made here: replace it.
    build_target(data_dir, target, preset.name, seed, arch, draw, overwrite=True)
    return target, True
