"""Whether texts share text: the test that keeps unseen documents apart from the sets a model learned.

Two texts share text when they share a run of ``SHARED_WORDS`` words: the span the contamination
checks of language-model evaluations use (13-grams, Brown et al. 2020, "Language Models are Few-Shot
Learners", appendix C), long enough that the common phrases of one kind of text do not count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SHARED_WORDS = 13


def _spans(text: str, width: int) -> set[tuple[str, ...]]:
    words = text.split()
    if len(words) < width:
        return {tuple(words)} if words else set()
    return {tuple(words[start:start + width]) for start in range(len(words) - width + 1)}


def sharing_indices(documents: Sequence[str], others: Iterable[str], width: int = SHARED_WORDS) -> list[int]:
    """The indices of the documents sharing a run of ``width`` words with one of ``others`` (a document
    shorter than that: contained in one of them)."""
    others = list(others)
    spans = set().union(*(_spans(text, width) for text in others)) if others else set()
    joined = [" ".join(text.split()) for text in others]
    sharing = []
    for index, document in enumerate(documents):
        words = document.split()
        if (any(" ".join(words) in text for text in joined) if len(words) < width
                else bool(_spans(document, width) & spans)):
            sharing.append(index)
    return sharing


def shared_text(documents: Sequence[str], others: Iterable[str], width: int = SHARED_WORDS) -> int | None:
    """The index of the first document sharing text with one of ``others``; None when none does."""
    sharing = sharing_indices(documents, others, width)
    return sharing[0] if sharing else None
