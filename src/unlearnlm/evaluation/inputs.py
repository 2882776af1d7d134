"""Loading and checking the sets an evaluation reads, without importing torch.

The CLI runs these before the first model loads, so a wrong file fails in a second, not after a
model has been loaded (or a long evaluation has run). Path and output checks are in ``unlearnlm.paths``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from unlearnlm.data.layouts import mia_file
from unlearnlm.data.raw import DEFAULT_TEXT_KEY, Rows, read_rows
from unlearnlm.data.records import Record, load_documents, load_records
from unlearnlm.errors import UserError


def load_general_set(path: str | Path) -> list[Record]:
    """The general set G: rows whose questions give the utility score, so it must have some."""
    rows = load_records(path, "general")
    if not any(row.kind == "qa" for row in rows):
        raise UserError(f"{path}: no question-answer rows (ids ending in qa<n>), so no utility score can be measured")
    return rows


def documents_from_rows(rows: Iterable[Record]) -> list[str]:
    """One document per sentence-completion row: ``input + " " + output``, the text a target learns."""
    return [row.input + " " + row.output for row in rows if row.kind == "sc"]


def set_documents(rows: Rows) -> list[str]:
    """A set's documents as the membership attack reads them: raw documents whole, or its SemEval rows'
    sentence completions."""
    return list(rows.documents) or documents_from_rows(rows.records)


def _first_object(path: Path) -> dict:
    """The first row, to tell the file's kind; an unreadable file is {} and its full reader says why."""
    try:
        return _first_line_object(path)
    except UnicodeDecodeError:
        return {}


def _first_line_object(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                return value if isinstance(value, dict) else {}
    return {}


def load_mia_documents(value, role: str = "members", text_key: str = DEFAULT_TEXT_KEY) -> list[str]:
    """MIA documents: an official ``{"document": ...}`` file (or a directory holding ``member.jsonl``
    and ``nonmember.jsonl``; ``role`` picks one), raw documents, SemEval rows (their ``sc`` rows),
    or a list of strings."""
    if isinstance(value, (str, Path)):
        path = mia_file(value, role)
        if path.is_file() and (path.suffix != ".jsonl" or "document" in _first_object(path)):
            return load_documents(path)
        value = path
    elif all(isinstance(item, str) for item in value):
        return list(value)
    rows = read_rows(value, role, text_key)
    documents = set_documents(rows)
    if not documents:
        raise UserError(f"{rows.source}: no sentence-completion rows to build MIA documents from")
    return documents
