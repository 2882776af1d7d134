"""Evaluate a model on forget/retain rows: generations, MIA, utility, MMLU -> the official results.

``evaluate_model`` returns the official results dict (``scoring.official_results``) with the details
next to it: the MIA attack suite, utility and MMLU breakdowns, the labels of the aggregated terms,
the settings and timings, and one row per generation. ``evaluate_paths`` does the same for several
model directories, loading and tokenizing the data once; ``quick_scores`` is the fast path the
training engine calls for checkpoint selection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unlearnlm.data.raw import RAW_TASKS
from unlearnlm.data.records import Record
from unlearnlm.data.tokenize import ensure_pad_token
from unlearnlm.data.windows import last_tokens
from unlearnlm.errors import UserError
from unlearnlm.evaluation.generation import MAX_NEW_TOKENS, generate_texts
from unlearnlm.evaluation.likelihood import Progress, TokenCache, encode_texts
from unlearnlm.evaluation.mia import DEFAULT_K, run_mia
from unlearnlm.evaluation.mmlu import DEFAULT_SHOTS, Subject, evaluate_mmlu, load_mmlu
from unlearnlm.evaluation.scoring import aggregated_terms, headline, official_results, score_rows
from unlearnlm.evaluation.utility import utility_score
from unlearnlm.hub import LoadedModel, ModelSource, resolve_model
from unlearnlm.model import model_context

DEFAULT_BATCH_SIZE = 16

# (phase, items just finished, items in the phase): how a caller follows a long evaluation.
Reporter = Callable[[str, int, int], None]


@dataclass
class EvalData:
    """Everything an evaluation reads, loaded once and shared by every model evaluated on it."""

    forget: Sequence[Record]
    retain: Sequence[Record]
    members: Sequence[str] | None = None
    nonmembers: Sequence[str] | None = None
    general: Sequence[Record] | None = None
    mmlu: Sequence[Subject] | None = None
    cache: TokenCache = field(default_factory=TokenCache)

    def __post_init__(self) -> None:
        if (self.members is None) != (self.nonmembers is None):
            raise UserError("the MIA needs both members and nonmembers, or neither")


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = DEFAULT_BATCH_SIZE
    official: bool = False  # the organizers' one-at-a-time generation and MIA
    max_new_tokens: int = MAX_NEW_TOKENS
    mmlu_shots: int = DEFAULT_SHOTS
    mia_k: float = DEFAULT_K
    mia_suite: bool = True  # the zlib / Min-K% / Min-K%++ attacks next to the official loss attack
    redact: bool = False  # mask forget answers and generations in printed and markdown output


def _phase(reporter: Reporter | None, name: str, total: int) -> Progress | None:
    return None if reporter is None else (lambda done: reporter(name, done, total))


def generation_rows(
    model, tokenizer, data: EvalData, settings: EvalSettings, reporter: Reporter | None = None
) -> list[dict]:
    """One scored row per forget and retain item, forget first, in file order."""
    records = [(record, "forget") for record in data.forget] + [(record, "retain") for record in data.retain]
    prompts = encode_texts(tokenizer, [record.input for record, _ in records], data.cache)
    context = model_context(model)
    if context:  # a long raw document's cut keeps the prompt's end, leaving room for the generation
        room = max(1, context - settings.max_new_tokens)
        prompts = [last_tokens(ids, room) if record.task in RAW_TASKS else ids for ids, (record, _) in zip(prompts, records)]
    generations = generate_texts(
        model, tokenizer, prompts, settings.official, settings.batch_size, settings.max_new_tokens,
        _phase(reporter, "generation", len(prompts)),
    )
    rows = [
        {"id": record.id, "task": record.task, "kind": record.kind, "split": split,
         "input": record.input, "output": reference(record, settings.max_new_tokens), "generation": generation}
        for (record, split), generation in zip(records, generations)
    ]
    return score_rows(rows)


def reference(record: Record, max_new_tokens: int) -> str:
    """What a generation is scored against: the row's answer; for a raw document's cut, the first
    ``max_new_tokens`` words of the rest of the document, the most a generation of that many tokens can
    give back. Against the whole rest, recall would fall with the document's length whatever the model
    recalls, and ROUGE-L's table would grow with it (a 5 MB document's first cut: 600,000 words)."""
    if record.task not in RAW_TASKS:
        return record.output
    return " ".join(record.output.split(" ")[:max_new_tokens])


def _timed(timings: dict[str, float], name: str, function: Callable, *args):
    start = time.perf_counter()
    result = function(*args)
    timings[name] = time.perf_counter() - start
    return result


def _mia(model, tokenizer, data: EvalData, settings: EvalSettings, reporter: Reporter | None) -> dict:
    # The organizers scored one document at a time; batched losses differ only by float rounding.
    batch_size = 1 if settings.official else settings.batch_size
    progress = _phase(reporter, "mia", len(data.members) + len(data.nonmembers))
    return run_mia(model, tokenizer, data.members, data.nonmembers, batch_size, settings.mia_k, settings.mia_suite,
                   progress, data.cache)


def _mmlu(model, tokenizer, data: EvalData, settings: EvalSettings, reporter: Reporter | None) -> dict:
    progress = _phase(reporter, "mmlu", sum(len(subject.test) for subject in data.mmlu))
    return evaluate_mmlu(model, tokenizer, data.mmlu, settings.mmlu_shots, settings.batch_size, progress, data.cache)


def _settings_record(model, data: EvalData, settings: EvalSettings) -> dict:
    return {
        "official": settings.official, "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens,
        "mmlu_shots": settings.mmlu_shots, "mia_k": settings.mia_k, "redact": settings.redact,
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
        "n_forget": len(data.forget), "n_retain": len(data.retain),
    }


def run_evaluation(model, tokenizer, data: EvalData, settings: EvalSettings, reporter: Reporter | None = None) -> dict:
    """The official results plus details; see the module docstring."""
    ensure_pad_token(tokenizer)
    timings: dict[str, float] = {}
    rows = _timed(timings, "generation_s", generation_rows, model, tokenizer, data, settings, reporter)
    mia = utility = mmlu = None
    if data.members is not None:
        mia = _timed(timings, "mia_s", _mia, model, tokenizer, data, settings, reporter)
    if data.general:
        utility = _timed(timings, "utility_s", utility_score, model, tokenizer, data.general, settings.batch_size,
                         None, data.cache)
    if data.mmlu:
        mmlu = _timed(timings, "mmlu_s", _mmlu, model, tokenizer, data, settings, reporter)
    results = official_results(
        rows,
        member_losses=mia["member_losses"] if mia else None,
        nonmember_losses=mia["nonmember_losses"] if mia else None,
        mmlu_average=mmlu["average_acc"] if mmlu else None,
        utility=utility["accuracy"] if utility else None,
    )
    summaries = {"forget": results["forget-set"], "retain": results["retain-set"]}
    results["aggregated-term-labels"] = [term.label for term in aggregated_terms(summaries)]
    for key, value in (("mia", mia), ("utility_details", utility), ("mmlu", mmlu)):
        if value is not None:
            results[key] = value
    results.update(settings=_settings_record(model, data, settings), timings=timings, generations=rows)
    return results


def evaluate_model(
    model,
    tokenizer,
    forget: Sequence[Record],
    retain: Sequence[Record],
    members: Sequence[str] | None = None,
    nonmembers: Sequence[str] | None = None,
    general: Sequence[Record] | None = None,
    mmlu_dir: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    official: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    redact: bool = False,
    mmlu_shots: int = DEFAULT_SHOTS,
    reporter: Reporter | None = None,
) -> dict:
    """Evaluate one loaded model; ``redact`` is recorded for the report (the returned rows stay whole)."""
    data = EvalData(forget, retain, members, nonmembers, general, load_mmlu(mmlu_dir) if mmlu_dir else None)
    settings = EvalSettings(batch_size, official, max_new_tokens, mmlu_shots, redact=redact)
    return run_evaluation(model, tokenizer, data, settings, reporter)


def quick_scores(
    model,
    tokenizer,
    forget_rows: Sequence[Record],
    retain_rows: Sequence[Record],
    members: Sequence[str] | None = None,
    nonmembers: Sequence[str] | None = None,
    general: Sequence[Record] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    cache: TokenCache | None = None,
) -> dict[str, float | None]:
    """Batched generation, loss-only MIA and utility: ``final``, ``task_aggregate``, ``mia_score``,
    ``mia_auc``, ``utility``, ``mmlu`` (``None`` where not measured). Restores the model's train mode.

    A caller that validates repeatedly on the same rows can pass one ``cache`` to tokenize them once.
    """
    data = EvalData(forget_rows, retain_rows, members, nonmembers, general, cache=cache or TokenCache())
    settings = EvalSettings(batch_size, max_new_tokens=max_new_tokens, mia_suite=False)
    return headline(run_evaluation(model, tokenizer, data, settings))


def load_model(path: str | Path | ModelSource, dtype: str = "float32", device: torch.device | None = None):
    """``(model, tokenizer)`` from a directory, adapter or Hub id, on ``device`` (see ``unlearnlm.model``)."""
    from unlearnlm.model import default_device, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype)
    return model.to(device or default_device()), tokenizer


def model_names(sources: Sequence[ModelSource | LoadedModel]) -> list[str]:
    """Short, distinct names for the report: the directory or repository name, numbered when two share one."""
    names = [source.name for source in sources]
    return [f"{name}-{index + 1}" if names.count(name) > 1 else name for index, name in enumerate(names)]


def evaluate_paths(
    paths: Sequence[str | Path | ModelSource | LoadedModel],
    data: EvalData,
    settings: EvalSettings,
    dtype: str = "float32",
    reporter: Callable[[str], Reporter] | None = None,
) -> list[tuple[str, dict]]:
    """``[(name, results)]`` for each model (directory, adapter, Hub id or loaded), one loaded at a time."""
    sources = [path if isinstance(path, LoadedModel) else resolve_model(path) for path in paths]
    evaluated = []
    for name, source in zip(model_names(sources), sources):
        model, tokenizer = (source.model, source.tokenizer) if isinstance(source, LoadedModel) else load_model(source, dtype)
        results = run_evaluation(model, tokenizer, data, settings, reporter(name) if reporter else None)
        results["settings"]["model"] = source.spec
        results["model_source"] = source.record()
        evaluated.append((name, results))
        del model
    return evaluated
