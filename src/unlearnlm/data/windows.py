"""A raw document longer than the model's context, cut into windows the model can take.

Windows are ``context`` tokens long and start every ``context - overlap`` tokens, so each window
after the first repeats the last ``overlap`` tokens of the one before. Those repeated tokens are
context only: a window scores (trains on, or counts in a likelihood) only the tokens no earlier
window scored, so every token of the document is scored exactly once, and every token after the
first window is predicted from at least ``overlap`` tokens before it. The overlap is a quarter of the
context (``OVERLAP_FRACTION``, at least one token). See docs/scoring.md, "Long documents".

Example: 10 tokens, a context of 4, an overlap of 1 (stride 3) give the windows ``[0, 4)``,
``[3, 7)`` and ``[6, 10)``, scoring positions 0-3, 4-6 and 7-9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from unlearnlm.data.tokenize import IGNORE_INDEX, Example

OVERLAP_FRACTION = 0.25


@dataclass(frozen=True)
class Window:
    """Positions ``[start, end)`` of the document, of which ``[scored_from, end)`` are scored."""

    start: int
    end: int
    scored_from: int


def default_overlap(context: int) -> int:
    return max(1, int(context * OVERLAP_FRACTION)) if context > 1 else 0


def windows(length: int, context: int, overlap: int | None = None) -> list[Window]:
    """The windows of a sequence of ``length`` tokens (one window when it fits the context)."""
    overlap = default_overlap(context) if overlap is None else overlap
    if context < 1 or not 0 <= overlap < context:
        raise ValueError(f"a context of {context} cannot overlap by {overlap}")
    result = [Window(0, min(length, context), 0)]
    while result[-1].end < length:
        start = result[-1].end - overlap
        result.append(Window(start, min(start + context, length), result[-1].end))
    return result


def window_examples(example: Example, context: int, overlap: int | None = None) -> list[Example]:
    """``example`` as one example per window; a window's labels keep only the tokens it scores.

    Only slices of the document's token list are built, never a full-length tensor, so a
    document of millions of tokens costs its token list and one window at a time."""
    result = []
    for window in windows(len(example.input_ids), context, overlap):
        repeated = window.scored_from - window.start
        labels = [IGNORE_INDEX] * repeated + example.labels[window.scored_from:window.end]
        result.append(Example(example.input_ids[window.start:window.end], labels, dict(example.meta)))
    return result


def last_tokens(ids: Sequence[int], room: int) -> list[int]:
    """A prompt's last ``room`` tokens: what a generation of a long document's cut keeps in context."""
    return list(ids[max(0, len(ids) - room):])
