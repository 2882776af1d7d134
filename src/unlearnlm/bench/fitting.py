"""The fitting loop the tiny benchmark's base, target and oracle train with, and the recall check
that stops it.

Stop criterion (cheap and exact): with teacher forcing, the argmax at every answer position equals
the answer token, which is exactly the condition for greedy decoding to reproduce the answer and stop
at its EOS (``measure_memorization``).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from unlearnlm.data.records import Record
from unlearnlm.data.tokenize import IGNORE_INDEX, Example, collate, length_sorted_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


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
