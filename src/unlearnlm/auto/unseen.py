"""The unseen documents U: text of the forget set's kind that the model was not fine-tuned on.

U is split once, by a seeded order: the first part sets the level a forgotten document should return
to (the model's mean loss per token on it, as ``unlearnlm level`` reads it), the held-out rest only
checks the result. A U that shares text with F or R would make the check compare the forget set with
itself, so it is refused before any model loads.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from unlearnlm.data.overlap import SHARED_WORDS, shared_text
from unlearnlm.data.raw import DEFAULT_TEXT_KEY, Rows, RowsInput
from unlearnlm.errors import UserError
from unlearnlm.evaluation.inputs import load_mia_documents

# Two documents for the level, two for the check: fewer leaves one side without a spread.
MIN_UNSEEN = 4


@dataclass(frozen=True)
class UnseenSplit:
    level: tuple[str, ...]  # sets the level
    check: tuple[str, ...]  # held out: read only by the check


def read_unseen(value: RowsInput, text_key: str = DEFAULT_TEXT_KEY) -> list[str]:
    """U as documents: raw ``{text}`` rows, MIA ``{document}`` rows, or SemEval rows (their
    sentence completions, ``input + " " + output``), from a path, a Hub split or in memory."""
    documents = load_mia_documents(value, "nonmembers", text_key)
    first = {}
    for index, document in enumerate(documents):
        earlier = first.setdefault(document, index)
        if earlier != index:  # a copy could land in both halves: the held-out check would read the level's text
            raise UserError(f"--unseen document {index + 1} repeats document {earlier + 1}: give each document once")
    if len(documents) < MIN_UNSEEN:
        raise UserError(f"--unseen: {len(documents)} documents; the level and the held-out check need at least "
                        f"{MIN_UNSEEN} (more make the check's bound tighter, docs/methods.md)")
    return documents


def set_texts(rows: Rows) -> list[str]:
    """Every text of a set a model may have been fine-tuned on: its documents, or each row's prompt and answer."""
    return list(rows.documents) or [record.input + " " + record.output for record in rows.records]


def refuse_overlap(unseen: Sequence[str], forget: Rows, retain: Rows, earlier: Sequence[Rows] = ()) -> None:
    refuse_shared(unseen, (("forget", forget), ("retain", retain),
                           *((f"earlier forget ({rows.source})", rows) for rows in earlier)))


def refuse_shared(unseen: Sequence[str], sets: Iterable[tuple[str, Rows]]) -> None:
    """Refuse U if it shares text with any of the named sets."""
    for name, rows in sets:
        index = shared_text(unseen, set_texts(rows))
        if index is not None:
            raise UserError(f"--unseen document {index + 1} shares text with the {name} set ({SHARED_WORDS} words or "
                            "more): U must be text the model was not fine-tuned on")


def split_unseen(documents: Sequence[str], seed: int) -> UnseenSplit:
    """Half of U (rounded down) for the level, the rest held out for the check, in a seeded order."""
    order = list(documents)
    random.Random(f"unlearnlm-unseen:{seed}").shuffle(order)
    half = len(order) // 2
    return UnseenSplit(tuple(order[:half]), tuple(order[half:]))
