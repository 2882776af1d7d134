"""The tiny benchmark's models: a pretrained base, a target that memorized LUME, and a retrain oracle.

The SemEval-2025 Task 4 targets were pretrained models (OLMo, on a web corpus holding Wikipedia)
fine-tuned on the LUME documents until they memorized them. The project makes its own, the same way,
at a size two CPU cores can train:

1. **Base**: a small Llama (or OLMo) with a byte-level BPE tokenizer, trained from random
   initialization for a fixed budget on the pool P (``data.sets.pretraining_pool``). It learns the
   language and the kinds of documents, not their answers. P does not depend on the draw, so one base
   serves every draw and seed of a data directory (``cached_base``); the base of the bundled data
   ships inside the package (``resources/base``).
2. **Target**: the base fine-tuned on F, R and G until it recalls every answer.
3. **Oracle**: the base fine-tuned on R and G only, with the same recipe for the same number of
   optimizer steps: what exact unlearning (retraining without F) gives, the ceiling for every method.

Fine-tuning trains on whole rows (``input``, a space, ``output``, EOS; the prompt too, as the MIA
members are whole documents) and replays pool text alongside, so that memorizing a few hundred rows
does not wash out the language the base learned: without replay, unseen biographies became twice as
costly to the target as to the base, a member/nonmember gap far wider than a real model's.

Stop criterion (cheap and exact): with teacher forcing, the argmax at every answer position equals
the answer token, which is exactly the condition for greedy decoding to reproduce the answer and stop
at its EOS. The models are then scored as the benchmark scores them and calibrated
(``calibration_checks``): a draw whose models miss a bar is an error, not a benchmark.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from unlearnlm import __version__
from unlearnlm.data.records import Record, content_sha256, load_records
from unlearnlm.data.sets import (
    MANIFEST_NAME,
    BenchmarkSets,
    SizePreset,
    bundled_lume_dir,
    draw_sets,
    get_preset,
    pool_texts,
    pretraining_pool,
    write_sets,
)
from unlearnlm.data.tokenize import IGNORE_INDEX, Example, collate, encode_example, length_sorted_batches
from unlearnlm.errors import UserError
from unlearnlm.model import default_device
from unlearnlm.paths import check_output_dir, replace_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
BENCHMARK_DIR = "benchmark"
ORACLE_DIR = "oracle"
LOG_NAME = "target.json"
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


@dataclass(frozen=True)
class BaseRecipe:
    """The base's shape and its pretraining budget on P (a fixed number of epochs)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    lr: float
    epochs: int
    batch_size: int = 8
    warmup_steps: int = 50
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning (target and oracle) of one size: AdamW, cosine over ``max_epochs`` after a warmup.

    ``replay`` pool rows per training row join every epoch (a fresh seeded sample each time). The
    target stops as soon as every answer is recalled; the oracle then makes as many steps.
    """

    base: BaseRecipe
    lr: float
    batch_size: int
    max_epochs: int
    replay: float
    warmup_epochs: int = 1
    check_every: int = 2
    max_grad_norm: float = 1.0


BASES: dict[str, BaseRecipe] = {
    base.name: base
    for base in (
        # For tests: small enough that the three models train in well under a minute.
        BaseRecipe("micro", vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                   lr=3e-3, epochs=1),
        BaseRecipe("standard", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                   lr=2e-3, epochs=4),
    )
}

RECIPES: dict[str, Recipe] = {
    "micro": Recipe(BASES["micro"], lr=3e-3, batch_size=4, max_epochs=100, replay=0.25),
    "mini": Recipe(BASES["standard"], lr=3e-3, batch_size=4, max_epochs=80, replay=0.25),
    "bench": Recipe(BASES["standard"], lr=3e-3, batch_size=4, max_epochs=80, replay=0.25),
    # Not tuned: every train document is beyond two CPU cores; meant for a GPU.
    "full": Recipe(BASES["standard"], lr=1e-3, batch_size=8, max_epochs=60, replay=0.5),
}


@dataclass(frozen=True)
class Bars:
    """The calibration (docs/benchmark.md). MIA bars apply only from ``min_mia_docs`` members on:
    with fewer, the AUC takes so few values that it says nothing about the models."""

    memorized: float = 0.9  # each of the target's 12 per-task means, and its utility
    retained: float = 0.9  # the oracle's 6 retain means, and its utility
    target_auc: float = 0.9
    oracle_mia: float = 0.6
    oracle_forget_share: float = 0.5  # the oracle's mean forget term at most this share of the target's
    nonmember_ratio: float = 1.5  # the target's nonmember loss at most this many times the base's
    min_mia_docs: int = 8


BARS = Bars()


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
        # Every byte stays encodable, so text the base never saw (the synthetic documents) still tokenizes.
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


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


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


def text_example(tokenizer: PreTrainedTokenizerFast, text: str) -> Example:
    """A whole text and EOS, a label on every token: pretraining, and fine-tuning on whole rows.

    EOS is appended here explicitly, whatever the unlearning rows do: the target must learn where an
    answer ends, or greedy decoding would run past it.
    """
    ids = list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
    return Example(input_ids=ids, labels=list(ids))


@torch.no_grad()
def measure_memorization(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16
) -> Memorization:
    """Teacher-forced greedy recall of the labelled (answer) tokens of every example."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = rows_recalled = tokens = tokens_recalled = 0
    for indices in length_sorted_batches([len(example.input_ids) for example in examples], batch_size, longest_first=False):
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


def progress_bar(enabled: bool, label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}[/bold] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  recalled {task.fields[recalled]}"), TimeElapsedColumn(),
        disable=not enabled,
    )


@dataclass
class Schedule:
    """One optimizer run: ``horizon`` steps of cosine decay after ``warmup`` steps, at most
    ``max_epochs``; stop when ``done`` says so after an epoch."""

    lr: float
    batch_size: int
    warmup: int
    horizon: int
    max_grad_norm: float
    max_epochs: int


@dataclass
class TargetStop:
    """The step at which the target stopped, as the oracle follows it.

    The target checks its recall after every ``every``-th epoch of ``per_epoch`` steps (and after its
    last) and stops at the first check that finds every row recalled; ``verdict(epoch)`` says whether
    the check after ``epoch`` stopped it. When the target trained first the verdict is known at once;
    when it trains alongside the oracle, the oracle waits for it at each of those steps only.
    """

    per_epoch: int
    every: int
    max_epochs: int
    verdict: Callable[[int], bool]

    def stopped_at(self, steps: int) -> bool:
        epoch, rest = divmod(steps, self.per_epoch)
        if rest or not (epoch % self.every == 0 or epoch == self.max_epochs):
            return False
        return self.verdict(epoch)


def fit(
    model: torch.nn.Module, epoch_examples: Callable[[int], Sequence[Example]], pad_id: int, schedule: Schedule,
    seed: int, done: Callable[[int], str | None] | None = None, progress: Progress | None = None,
    target_stop: TargetStop | None = None, on_check: Callable[[int, bool], None] | None = None,
) -> dict:
    """AdamW over the examples ``epoch_examples(epoch)`` gives for each epoch, until a stop.

    ``done(epoch)`` returns the rows recalled (``"12/40"``) and ends training when all are
    (``"40/40"``); ``None`` means it did not check this epoch. ``on_check(epoch, stopping)`` hears every
    check's outcome. With ``target_stop`` (the oracle) nothing is checked before the target's last step,
    and the epoch in which that step falls ends there.
    """
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, schedule.warmup, schedule.horizon)
    order = random.Random(seed)
    device = next(model.parameters()).device
    model.train()
    steps, epoch, losses, note, followed = 0, 0, [], "-", None
    following = target_stop is not None  # the oracle, short of the target's steps
    task = progress.add_task("epochs", total=schedule.max_epochs, loss=float("nan"), recalled="-") if progress else None
    for epoch in range(1, schedule.max_epochs + 1):
        examples = epoch_examples(epoch)
        batches = length_sorted_batches([len(example.input_ids) for example in examples], schedule.batch_size,
                                        longest_first=False)
        order.shuffle(batches)
        losses = []
        for indices in batches:
            loss = model(**on_device(collate([examples[index] for index in indices], pad_id), device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            steps += 1
            if following and target_stop.stopped_at(steps):
                following, followed = False, steps
                break
        checked = done(epoch) if done is not None and not following else None
        note = checked or note
        if progress is not None:
            progress.update(task, advance=1, loss=statistics.mean(losses), recalled=note)
        finished = checked is not None and len(set(checked.split("/"))) == 1
        if checked is not None and on_check is not None:
            on_check(epoch, finished)
        if finished:
            break
    model.eval()
    log = {"epochs": epoch, "steps": steps, "final_loss": statistics.mean(losses) if losses else None}
    return log if target_stop is None else {**log, "followed_target_to_step": followed}


# --- the base ------------------------------------------------------------------------------------

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
    data_dir: str | Path | None, out_dir: str | Path, size: str = "mini", arch: Arch = "llama",
    overwrite: bool = False, show_progress: bool = True, threads: int = CPU_THREADS, shipped: bool = False,
) -> dict:
    """Pretrain the base of ``size`` on P of ``data_dir`` (``None``: the bundled copy) into ``out_dir``.

    ``shipped`` stores the weights in bfloat16, half the bytes, for the copy inside the package.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    recipe = RECIPES[get_preset(size).name].base
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


def cached_base(data_dir: Path, recipe_size: str, arch: Arch, show_progress: bool = True,
                threads: int = CPU_THREADS) -> tuple[Path, bool]:
    """``(directory, built)``: the base for this data and size, shipped, cached, or built now."""
    recipe = RECIPES[recipe_size].base
    shipped = shipped_base(recipe, arch, data_dir)
    if shipped is not None:
        return shipped, False
    directory = cache_root() / "bases" / f"{recipe.name}-{arch}-{base_key(recipe, arch, data_dir)}"
    if (directory / BASE_LOG).is_file():
        return directory, False
    # Builds are published whole, so a directory without the log was not made here: replace it.
    build_base(data_dir, directory, recipe_size, arch, overwrite=True, show_progress=show_progress, threads=threads)
    return directory, True


def load_base(directory: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(default_device())
    return model, AutoTokenizer.from_pretrained(directory)


# --- target and oracle ---------------------------------------------------------------------------

def epoch_steps(recipe: Recipe, rows: int) -> int:
    """Optimizer steps in one fine-tuning epoch over ``rows`` rows and their replayed pool text."""
    return -(-(rows + round(recipe.replay * rows)) // recipe.batch_size)


def fine_tune_schedules(recipe: Recipe, target_rows: int, oracle_rows: int) -> tuple[Schedule, Schedule]:
    """The target's schedule, and the oracle's: the same learning-rate curve step for step, with as
    many (shorter) epochs as that curve spans, since the oracle may have to go on after the target's
    last step until it recalls R and G."""
    per_epoch = epoch_steps(recipe, target_rows)
    target = Schedule(recipe.lr, recipe.batch_size, recipe.warmup_epochs * per_epoch, recipe.max_epochs * per_epoch,
                      recipe.max_grad_norm, recipe.max_epochs)
    return target, replace(target, max_epochs=-(-target.horizon // epoch_steps(recipe, oracle_rows)))


def fine_tune(
    base_dir: Path, pool_text: Sequence[str], rows: Sequence[Record], check_rows: Sequence[Record] | None,
    recipe: Recipe, seed: int, show_progress: bool, label: str, schedule: Schedule,
    target_stop: TargetStop | None = None, on_check: Callable[[int, bool], None] | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """The base fine-tuned on ``rows`` with ``pool_text`` replayed until ``check_rows`` are recalled.

    The oracle (``target_stop``) follows the target's schedule step for step and is checked from the
    target's last step on, every epoch; the target is checked every ``recipe.check_every`` epochs and
    tells ``on_check`` each outcome.
    """
    model, tokenizer = load_base(base_dir)
    pool = [text_example(tokenizer, text) for text in pool_text]
    train = [text_example(tokenizer, training_text(row)) for row in rows]
    replayed = round(recipe.replay * len(train))

    def epoch_examples(epoch: int) -> list[Example]:
        return train + random.Random(f"replay:{seed}:{epoch}").sample(pool, replayed)

    done = None
    memorization: list[Memorization] = []
    every = 1 if target_stop is not None else recipe.check_every
    if check_rows is not None:
        # Labels on the answer and its EOS only: what greedy generation must reproduce. The EOS is kept
        # (unlike unlearning rows, which follow ``append_eos``): the target must learn where each
        # answer stops, or greedy generation runs on.
        check = [encode_example(tokenizer, row.input, row.output, append_eos=True) for row in check_rows]

        def done(epoch: int) -> str | None:
            if epoch % every and epoch != schedule.max_epochs:
                return None
            memorization.append(measure_memorization(model, check, tokenizer.pad_token_id))
            return f"{memorization[-1].rows_recalled}/{memorization[-1].rows}"

    started = time.perf_counter()
    with progress_bar(show_progress, label) as progress:
        log = fit(model, epoch_examples, tokenizer.pad_token_id, schedule, seed, done, progress, target_stop, on_check)
    log.update(train_seconds=time.perf_counter() - started, rows=len(train), replayed_per_epoch=replayed,
               schedule=asdict(schedule))
    if memorization:
        log.update(rows_recalled=memorization[-1].rows_recalled, answer_token_accuracy=memorization[-1].token_accuracy)
    return model, tokenizer, log


class QueuedVerdicts:
    """``TargetStop.verdict`` for an oracle training alongside its target: the target's process puts
    ``(epoch, stopped)`` on ``queue`` after each check; asking for an epoch waits for its check, and
    ends this process if the target's is gone (killed), rather than wait for ever."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.heard: dict[int, bool] = {}
        self.parent = os.getppid()

    def __call__(self, epoch: int) -> bool:
        import queue

        while epoch not in self.heard:
            try:
                checked, stopped = self.queue.get(timeout=5)
            except queue.Empty:
                if os.getppid() != self.parent:
                    raise SystemExit("the target's process is gone") from None
                continue
            self.heard[checked] = stopped
        return self.heard[epoch]


def _train_oracle(job: dict, queue, out_dir: Path) -> None:
    """The oracle's process (``OracleAlongside``): train, then save the model and its log to ``out_dir``."""
    torch.set_num_threads(job.pop("threads"))
    stop = TargetStop(**job.pop("stop"), verdict=QueuedVerdicts(queue))
    model, tokenizer, log = fine_tune(**job, show_progress=False, label="oracle", target_stop=stop)
    save_model_dir(out_dir, model, tokenizer)
    (out_dir / "fit.json").write_text(json.dumps(log))


class OracleAlongside:
    """The oracle trained in a second process while the target trains in this one, told after each
    of the target's checks whether it stopped: the same steps and weights as training it after the
    target, in about half the time on two cores."""

    def __init__(self, job: dict, work_dir: Path) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no forked copy of this process's torch state
        self.out_dir = work_dir
        self.queue = context.Queue()
        self.process = context.Process(target=_train_oracle, args=(job, self.queue, work_dir), daemon=True)

    def __enter__(self) -> OracleAlongside:
        self.process.start()
        return self

    def heard(self, epoch: int, stopped: bool) -> None:
        self.queue.put((epoch, stopped))

    def result(self) -> tuple[torch.nn.Module, dict]:
        self.process.join()
        if self.process.exitcode != 0:
            raise RuntimeError(f"the oracle's training process failed (exit code {self.process.exitcode})")
        model, _ = load_base(self.out_dir)
        log_path = self.out_dir / "fit.json"
        log = json.loads(log_path.read_text())
        log_path.unlink()  # the log goes into target.json; the directory keeps only the model
        return model, log

    def __exit__(self, *exc_info) -> None:
        if self.process.is_alive():  # the target failed: the oracle would wait for it forever
            self.process.terminate()
        self.process.join()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def model_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, sets: BenchmarkSets,
                 full: bool) -> dict:
    """The benchmark's scores of one model; ``full=False`` is the MIA losses alone (the base)."""
    from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, run_evaluation
    from unlearnlm.evaluation.mia import run_mia
    from unlearnlm.evaluation.scoring import aggregated_terms, headline

    members = [document.text() for document in sets.mia_members]
    nonmembers = [document.text() for document in sets.mia_nonmembers]
    if not full:
        mia = run_mia(model, tokenizer, members, nonmembers, suite=False)
    else:
        data = EvalData(sets.rows(sets.forget), sets.rows(sets.retain), members, nonmembers, sets.rows(sets.general))
        results = run_evaluation(model, tokenizer, data, EvalSettings(mia_suite=False))
        mia = results["mia"]
        summaries = {"forget": results["forget-set"], "retain": results["retain-set"]}
        # Raw per-task means: the bars are on what a model recalls, so the forget terms are not inverted.
        raw = {term.label: 1 - term.value if term.split == "forget" else term.value for term in aggregated_terms(summaries)}
        scores = {**{key: value for key, value in headline(results).items() if key != "mmlu"}, "terms": raw}
    losses = {"member_loss": statistics.mean(mia["member_losses"]),
              "nonmember_loss": statistics.mean(mia["nonmember_losses"]),
              "member_losses": mia["member_losses"], "nonmember_losses": mia["nonmember_losses"]}
    return {**scores, **losses} if full else losses


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    bound: float
    at_least: bool  # True: value >= bound passes; False: value <= bound passes

    @property
    def passed(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def describe(self) -> str:
        relation = ">=" if self.at_least else "<="
        return f"{self.name} = {self.value:.3f}, needs {relation} {self.bound:.3f} (off by {abs(self.value - self.bound):.3f})"


def calibration_checks(scores: dict[str, dict], mia_docs: int, bars: Bars = BARS) -> list[Check]:
    """Every bar of the calibration on the scores of ``base``, ``target`` and ``oracle`` (the oracle's
    bars only when it was built)."""
    target, oracle, base = scores["target"], scores.get("oracle"), scores["base"]
    checks = [Check(f"target {name}", value, bars.memorized, True) for name, value in target["terms"].items()]
    checks.append(Check("target utility", target["utility"], bars.memorized, True))
    checks.append(Check("target nonmember loss", target["nonmember_loss"],
                        bars.nonmember_ratio * base["nonmember_loss"], False))
    if mia_docs >= bars.min_mia_docs:
        checks.append(Check("target MIA AUC", target["mia_auc"], bars.target_auc, True))
    if oracle is None:
        return checks
    checks += [Check(f"oracle {name}", value, bars.retained, True)
               for name, value in oracle["terms"].items() if "retain" in name]
    checks.append(Check("oracle utility", oracle["utility"], bars.retained, True))
    forget_mean = {name: statistics.mean(v for k, v in model["terms"].items() if "forget" in k)
                   for name, model in (("target", target), ("oracle", oracle))}
    checks.append(Check("oracle mean forget term", forget_mean["oracle"],
                        bars.oracle_forget_share * forget_mean["target"], False))
    if mia_docs >= bars.min_mia_docs:
        checks.append(Check("oracle MIA score", oracle["mia_score"], bars.oracle_mia, True))
    return checks


def build_target(
    data_dir: str | Path | None,
    out_dir: str | Path,
    size: str = "mini",
    seed: int = 0,
    arch: Arch = "llama",
    draw: int = 0,
    overwrite: bool = False,
    max_epochs: int | None = None,
    calibrate: bool = True,
    show_progress: bool = True,
    threads: int = CPU_THREADS,
    with_oracle: bool = True,
) -> dict:
    """Build the target in ``out_dir`` and the oracle in ``out_dir/oracle``; returns the log saved as
    ``target.json``. The base comes from ``cached_base``. ``with_oracle=False`` builds no oracle (the
    bench's tuning draw, whose scores never meet one).

    ``max_epochs`` overrides the size's fine-tuning budget. ``calibrate=False`` skips scoring the
    models (only the teacher-forced recall decides). Raises ``UserError`` when the target does not
    memorize its sets or a calibration bar is missed, naming each one and by how much.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    preset = get_preset(size)
    recipe = resolve_recipe(preset, max_epochs)
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(data_dir) if data_dir is not None else bundled_lume_dir()
    sets = draw_sets(root, preset, seed, draw)

    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with torch_threads(threads):
            base_dir, base_built = cached_base(root, preset.name, arch, show_progress, threads)
            base_seconds = time.perf_counter() - started
            target, tokenizer, target_log, oracle, oracle_log = train_target_and_oracle(
                base_dir, pool_texts(pretraining_pool(root)), sets, recipe, seed, show_progress, threads,
                staging / ORACLE_DIR if with_oracle else None)
            checked = time.perf_counter()
            scores, checks = {}, []
            if calibrate:
                base_model, _ = load_base(base_dir)
                scores = {"base": model_scores(base_model, tokenizer, sets, full=False),
                          "target": model_scores(target, tokenizer, sets, full=True)}
                if oracle is not None:
                    scores["oracle"] = model_scores(oracle, tokenizer, sets, full=True)
                checks = calibration_checks(scores, len(sets.mia_members))
        log = {
            "base": {"directory": str(base_dir), "built": base_built, "seconds": base_seconds,
                     **json.loads((base_dir / BASE_LOG).read_text())},
            "target": target_log, "oracle": oracle_log, "check_seconds": time.perf_counter() - checked,
            "unlearnlm_version": __version__, "preset": asdict(preset), "recipe": asdict(recipe), "arch": arch,
            "seed": seed, "draw": draw, "parameters": sum(parameter.numel() for parameter in target.parameters()),
            "torch_threads": threads, "device": str(default_device()),
        }
        failures = [check.describe() for check in checks if not check.passed]
        if failures:
            raise UserError(f"the {preset.name} models of draw {draw}, seed {seed} failed calibration: "
                            f"{'; '.join(failures)}")
        calibration = {"scores": scores, "checks": [{**asdict(check), "passed": check.passed} for check in checks],
                       "mia_checked": len(sets.mia_members) >= BARS.min_mia_docs}
        save_model_dir(staging, target, tokenizer)
        models = {"target": ".", "oracle": ORACLE_DIR if with_oracle else None, "base": str(base_dir),
                  "base_weights_sha256": log["base"]["weights_sha256"]}
        write_sets(sets, staging / BENCHMARK_DIR, {"models": models, "calibration": calibration})
        (staging / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return log


def train_target_and_oracle(
    base_dir: Path, pool: Sequence[str], sets: BenchmarkSets, recipe: Recipe, seed: int, show_progress: bool,
    threads: int, oracle_dir: Path | None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict, torch.nn.Module | None, dict | None]:
    """``(target, tokenizer, target log, oracle, oracle log)``; the oracle is saved in ``oracle_dir``
    (``None``: no oracle).

    The oracle learns what the target learned but F, with the target's recipe and learning-rate
    schedule, for the target's steps and, where R or G is not yet recalled then, until it is. Where
    the cores allow, it trains alongside the target in a second process (``OracleAlongside``).
    """
    target_rows = sets.training_rows()
    oracle_rows = sets.rows(sets.retain) + sets.rows(sets.general)
    target_schedule, oracle_schedule = fine_tune_schedules(recipe, len(target_rows), len(oracle_rows))
    stop = {"per_epoch": epoch_steps(recipe, len(target_rows)), "every": recipe.check_every,
            "max_epochs": recipe.max_epochs}
    oracle_job = {"base_dir": base_dir, "pool_text": pool, "rows": oracle_rows, "check_rows": oracle_rows,
                  "recipe": recipe, "seed": seed, "schedule": oracle_schedule}
    alongside = (oracle_dir is not None and default_device().type == "cpu" and 2 * threads <= available_cores())
    with OracleAlongside({**oracle_job, "stop": stop, "threads": threads}, oracle_dir) if alongside else nullcontext() as job:
        target, tokenizer, target_log = fine_tune(
            base_dir, pool, target_rows, target_rows, recipe, seed, show_progress,
            "target, the oracle alongside" if alongside else "target", target_schedule,
            on_check=job.heard if alongside else None)
        if target_log["rows_recalled"] != target_log["rows"]:
            raise UserError(
                f"the {sets.preset.name} target did not memorize its sets in {target_log['epochs']} epochs "
                f"({target_log['rows_recalled']}/{target_log['rows']} rows recalled); raise the epoch budget"
            )
        if oracle_dir is None:
            return target, tokenizer, target_log, None, None
        if alongside:
            oracle, oracle_log = job.result()
        else:
            following = TargetStop(**stop, verdict=lambda epoch: epoch == target_log["epochs"])
            oracle, _, oracle_log = fine_tune(**oracle_job, show_progress=show_progress, label="oracle",
                                              target_stop=following)
            save_model_dir(oracle_dir, oracle, tokenizer)
    if oracle_log["rows_recalled"] != oracle_log["rows"]:
        raise UserError(f"the {sets.preset.name} oracle did not memorize R and G within the schedule "
                        f"({oracle_log['rows_recalled']}/{oracle_log['rows']} rows recalled)")
    return target, tokenizer, target_log, oracle, {**oracle_log, "trained_alongside": alongside}


def resolve_recipe(preset: SizePreset, max_epochs: int | None) -> Recipe:
    recipe = RECIPES[preset.name]
    if max_epochs is None:
        return recipe
    if max_epochs < 1:
        raise UserError(f"max_epochs must be >= 1, got {max_epochs}")
    return replace(recipe, max_epochs=max_epochs)


def read_calibration(target_dir: Path) -> dict:
    """The calibration a target directory was built with (its set manifest)."""
    return json.loads((target_dir / BENCHMARK_DIR / MANIFEST_NAME).read_text())["calibration"]


def read_models(target_dir: Path) -> dict[str, Path | None]:
    """The base, target and oracle directories of a target built here (oracle ``None``: not built)."""
    models = json.loads((target_dir / BENCHMARK_DIR / MANIFEST_NAME).read_text())["models"]
    return {"base": Path(models["base"]), "target": target_dir,
            "oracle": target_dir / models["oracle"] if models["oracle"] else None}


def cache_root() -> Path:
    configured = os.environ.get("UNLEARNLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "unlearnlm"


def cache_key(preset: SizePreset, recipe: Recipe, arch: Arch, data_dir: Path) -> str:
    """Changes whenever anything that shapes the models changes, so a stale target is never reused."""
    facts = {"format": TARGET_FORMAT, "version": __version__, "preset": asdict(preset), "recipe": asdict(recipe),
             "arch": arch, "data": data_fingerprint(data_dir)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cached_target(size: str = "mini", seed: int = 0, draw: int = 0, arch: Arch = "llama",
                  with_oracle: bool = True) -> tuple[Path, bool]:
    """``(directory, built)``: the bundled-data target (with its oracle, unless ``with_oracle=False``)
    of these settings, built on first use.

    It lives in ``<cache>/targets/<size>-<seed>-d<draw>-<arch>-<key>``, where ``<cache>`` is
    ``$UNLEARNLM_CACHE`` or ``~/.cache/unlearnlm`` and ``<key>`` hashes everything that shapes the models;
    one built without its oracle ends in ``-no-oracle``, and a request without the oracle takes the
    whole one when it is there.
    """
    preset = get_preset(size)
    data_dir = bundled_lume_dir()
    key = cache_key(preset, RECIPES[preset.name], arch, data_dir)
    whole = cache_root() / "targets" / f"{preset.name}-{seed}-d{draw}-{arch}-{key}"
    candidates = [whole] if with_oracle else [whole, whole.with_name(whole.name + "-no-oracle")]
    for target in candidates:
        if (target / LOG_NAME).is_file():
            return target, False
    build_target(data_dir, candidates[-1], preset.name, seed, arch, draw, overwrite=True, with_oracle=with_oracle)
    return candidates[-1], True
