"""Utility, the tiny benchmark's stand-in for MMLU (docs/benchmark.md).

Four-way multiple choice on the question rows of the general set G: the options are the true answer
and three answers of other G questions of the same task and the same question kind, where the kind
is the id's question slot (``qa0`` .. ``qa4``), so a Task2 birth-date question gets three other birth
dates as distractors. When a slot has too few distinct answers, other answers of the same task, then
of any task, fill in. The draw and the order of the options are seeded by the question id, so every
model evaluated on the same G gets the same items. The model picks the option whose ``" " + option``
has the highest total log-likelihood after the question; accuracy is over all G questions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from unlearnlm.data.records import Record
from unlearnlm.data.tokenize import IGNORE_INDEX, Example
from unlearnlm.evaluation.likelihood import Progress, TokenCache, encode_texts, token_statistics

N_OPTIONS = 4
SEED = 0


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    task: str
    question: str
    options: tuple[str, ...]
    answer_index: int


def _normalized(answer: str) -> str:
    return answer.strip().lower()


def _rng(row_id: str, seed: int) -> random.Random:
    # hashlib, not hash(): str hashes change between processes.
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _distractors(row: Record, questions: Sequence[Record], rng: random.Random, count: int) -> list[str]:
    pools = (
        [other for other in questions if other.task == row.task and other.id[-3:] == row.id[-3:]],
        [other for other in questions if other.task == row.task],
        list(questions),
    )
    chosen: list[str] = []
    seen = {_normalized(row.output)}
    for pool in pools:
        candidates = sorted({other.output for other in pool})
        rng.shuffle(candidates)
        for answer in candidates:
            if len(chosen) == count:
                return chosen
            if _normalized(answer) not in seen:
                seen.add(_normalized(answer))
                chosen.append(answer)
    return chosen


def build_choice_items(general: Sequence[Record], n_options: int = N_OPTIONS, seed: int = SEED) -> list[ChoiceItem]:
    """One multiple-choice item per question row of ``general``; fewer options only if G has too few answers."""
    questions = [row for row in general if row.kind == "qa"]
    items = []
    for row in questions:
        rng = _rng(row.id, seed)
        options = [row.output, *_distractors(row, questions, rng, n_options - 1)]
        rng.shuffle(options)
        items.append(ChoiceItem(row.id, row.task, row.input, tuple(options), options.index(row.output)))
    return items


def option_loglikelihoods(
    model, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16,
    progress: Progress | None = None, cache: TokenCache | None = None,
) -> list[list[float]]:
    """Total log-likelihood of each option after its question, tokenized as training joins them."""
    prompts = encode_texts(tokenizer, [item.question for item in items], cache)
    option_texts = sorted({" " + option for item in items for option in item.options})
    option_ids = dict(zip(option_texts, encode_texts(tokenizer, option_texts, cache, add_special_tokens=False)))
    examples, owners = [], []
    for item_index, (item, prompt) in enumerate(zip(items, prompts)):
        for option in item.options:
            continuation = option_ids[" " + option]
            examples.append(Example(prompt + continuation, [IGNORE_INDEX] * len(prompt) + continuation))
            owners.append(item_index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stats = token_statistics(model, examples, pad_id, batch_size, progress=progress)
    totals: list[list[float]] = [[] for _ in items]
    for owner, item_stats in zip(owners, stats):
        totals[owner].append(float(item_stats.logprobs.sum()))
    return totals


def utility_score(
    model, tokenizer, general: Sequence[Record], batch_size: int = 16,
    progress: Progress | None = None, cache: TokenCache | None = None,
) -> dict:
    """``{"accuracy", "per_task", "n_questions", "predictions"}``; the first maximum wins a tie."""
    items = build_choice_items(general)
    if not items:
        raise ValueError("the general set has no question rows, so utility cannot be measured")
    scores = option_loglikelihoods(model, tokenizer, items, batch_size, progress, cache)
    predictions = [max(range(len(option_scores)), key=option_scores.__getitem__) for option_scores in scores]
    correct = [prediction == item.answer_index for prediction, item in zip(predictions, items)]
    per_task = {}
    for task in sorted({item.task for item in items}):
        task_correct = [hit for hit, item in zip(correct, items) if item.task == task]
        per_task[task] = sum(task_correct) / len(task_correct)
    return {
        "accuracy": sum(correct) / len(correct),
        "per_task": per_task,
        "n_questions": len(items),
        "predictions": [
            {"id": item.id, "options": list(item.options), "answer": item.answer_index, "predicted": prediction}
            for item, prediction in zip(items, predictions)
        ],
    }
