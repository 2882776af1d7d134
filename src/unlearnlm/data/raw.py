"""Rows as a command or the Python API receives them: SemEval rows or raw documents, from files, a
Hub data set split, a list of dicts or a ``datasets.Dataset``.

Raw documents are rows with one text field (``text`` unless told otherwise) and no SemEval fields:
a customer's records, a licensed book cut into passages. They are forgotten whole and evaluated by
regurgitation (see docs/scoring.md, "Raw documents"):

- for unlearning, a document is one row whose prompt is its first word and whose answer is the
  rest, so the loss covers every token a model can predict (the first has no context) and the
  tokens are those of the document itself; a document longer than the model's context trains
  as one row per window (data/windows.py);
- for evaluation, each document gives one sentence-completion row per cut in ``CUT_FRACTIONS``:
  the prompt is the document's first words up to that fraction, the answer the rest, scored like
  any SemEval completion (ROUGE-L recall of the generation against the answer); a prompt longer
  than the model's context less the tokens to generate keeps only its last tokens (its nearest
  context), so every cut of a long document can be asked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearnlm.data.records import (
    REQUIRED_FIELDS,
    Record,
    check_unique_ids,
    content_sha256,
    data_files,
    read_table,
    validate_row,
)
from unlearnlm.errors import UserError

DEFAULT_TEXT_KEY = "text"
CUT_FRACTIONS = (0.25, 0.5, 0.75)
DOCUMENT_TASK = "document"  # the training row of a whole raw document
RAW_TASK = "cut{percent}"  # one task per cut, so the report shows each cut's regurgitation apart
RAW_TASKS = frozenset(RAW_TASK.format(percent=round(fraction * 100)) for fraction in CUT_FRACTIONS)

RowsInput = str | Path | Sequence[Mapping[str, Any]] | Any  # Any: a datasets.Dataset


@dataclass(frozen=True)
class Rows:
    """One input set: SemEval ``records`` or raw ``documents`` (one of them), where they came from
    and a sha256 of their content."""

    source: str
    sha256: str
    records: tuple[Record, ...] = ()
    documents: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.documents) or len(self.records)

    @property
    def is_raw(self) -> bool:
        return bool(self.documents)

    def for_training(self) -> list[Record]:
        return [document_row(index, text) for index, text in enumerate(self.documents)] or list(self.records)

    def for_evaluation(self) -> list[Record]:
        return [row for index, text in enumerate(self.documents) for row in cut_rows(index, text)] or list(self.records)


def _words(text: str) -> list[str]:
    return text.split(" ")


def document_row(index: int, text: str) -> Record:
    head, _, tail = text.partition(" ")
    return Record(id=f"doc{index}sc1", input=head, output=tail, task=DOCUMENT_TASK)


def cut_rows(index: int, text: str, fractions: Iterable[float] = CUT_FRACTIONS) -> list[Record]:
    """The document's prompts cut at ``fractions`` of its words (at least one word on each side)."""
    words = _words(text)
    rows = []
    for fraction in fractions:
        cut = min(max(1, round(fraction * len(words))), len(words) - 1)
        percent = round(fraction * 100)
        rows.append(Record(id=f"doc{index}cut{percent}sc1", input=" ".join(words[:cut]), output=" ".join(words[cut:]),
                           task=RAW_TASK.format(percent=percent)))
    return rows


def _raw_documents(raws: Sequence[Mapping], text_key: str, where: str) -> tuple[str, ...]:
    documents = []
    for number, raw in enumerate(raws, start=1):
        text = raw.get(text_key) if isinstance(raw, Mapping) else None
        if not isinstance(text, str):
            raise UserError(f"{where} row {number}: missing string field {text_key!r}")
        if len(_words(text.strip())) < 2:
            raise UserError(f"{where} row {number}: a document needs at least two words (a prompt and a continuation)")
        documents.append(text.strip())
    return tuple(documents)


def _is_raw(raws: Sequence[Mapping], text_key: str) -> bool:
    first = raws[0] if raws else {}
    return isinstance(first, Mapping) and text_key in first and not any(name in first for name in REQUIRED_FIELDS)


def rows_from_dicts(raws: Sequence[Mapping], where: str,
                    text_key: str = DEFAULT_TEXT_KEY) -> tuple[tuple[Record, ...], tuple[str, ...]]:
    """``(records, documents)``: SemEval rows validated as such, or raw documents."""
    if _is_raw(raws, text_key):
        return (), _raw_documents(raws, text_key, where)
    records = tuple(validate_row(raw, f"{where} row {number}") for number, raw in enumerate(raws, start=1))
    check_unique_ids(records, where)
    return records, ()


def read_rows(value: RowsInput, split: str = "forget", text_key: str = DEFAULT_TEXT_KEY, allow_empty: bool = False) -> Rows:
    """A path or Hub split (see ``records.load_records``), a list of dicts or a ``datasets.Dataset``."""
    if isinstance(value, (str, Path)):
        raws = [raw for file in data_files(value, split) for raw in read_table(file)]
        source, digest = str(value), content_sha256(value)
    else:
        raws = [dict(raw) for raw in value]
        source = f"<{len(raws)} {split} rows given in memory>"
        digest = hashlib.sha256("".join(json.dumps(raw, sort_keys=True, ensure_ascii=False) + "\n"
                                        for raw in raws).encode()).hexdigest()
    records, documents = rows_from_dicts(raws, str(value) if isinstance(value, (str, Path)) else f"{split} rows", text_key)
    rows = Rows(source, digest, records, documents)
    if not len(rows) and not allow_empty:
        raise UserError(f"{source}: the {split} set is empty")
    if records and not any(record.output.strip() for record in records):
        raise UserError(f"{source}: every answer ('output') of the {split} set is empty, so there is nothing to "
                        f"{'forget' if split == 'forget' else 'measure'}")
    return rows


def _row_keys(rows: Rows) -> list[tuple[str, str, str]]:
    return [(record.id, record.input, record.output) for record in rows.records]


def refuse_shared_rows(forget: Rows, retain: Rows) -> None:
    """Forget and retain sets that share data ask for the impossible: to forget and keep the same text."""
    shared = set(forget.documents) & set(retain.documents)
    if shared:
        raise UserError(f"the forget and retain sets share {len(shared)} document(s), e.g. "
                        f"{next(iter(shared))[:60]!r}; a text cannot be forgotten and kept")
    # Rows, not sources: one SemEval snapshot directory rightly serves as both (its forget and retain files).
    if _row_keys(forget) == _row_keys(retain) and list(forget.documents) == list(retain.documents):
        raise UserError(f"the forget and retain sets are the same data ({forget.source}, {retain.source})")
    texts = {(record.input, record.output): record.id for record in retain.records}
    ids = {record.id for record in retain.records}
    both = [record.id for record in forget.records if record.id in ids or (record.input, record.output) in texts]
    if both:
        raise UserError(f"the forget and retain sets share {len(both)} row(s) (same id or text), e.g. {both[0]!r}; "
                        "a row cannot be forgotten and kept")
