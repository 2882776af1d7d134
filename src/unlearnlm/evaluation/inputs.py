"""Loading and checking the sets an evaluation reads, without importing torch.

The CLI runs these before the first model loads, so a wrong file fails in a second, not after a
model has been loaded (or a long evaluation has run). Path and output checks are in ``unlearnlm.paths``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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


def _first_object(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                return value if isinstance(value, dict) else {}
    return {}


def load_mia_documents(path: str | Path) -> list[str]:
    """Documents from an official ``{"document": ...}`` file, or from a rows file (its ``sc`` rows)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".jsonl" and "document" not in _first_object(path):
        documents = documents_from_rows(load_records(path))
        if not documents:
            raise UserError(f"{path}: no sentence-completion rows to build MIA documents from")
        return documents
    return load_documents(path)
