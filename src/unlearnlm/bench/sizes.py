"""The benchmark's sizes: one table, each size's documents per set and the recipe of its models.

``data.sets.PRESETS`` (the documents), ``RECIPES`` (the models) and the command line's ``--size``
choices are all read from ``SIZES``; a new size is one row here (docs/extending.md). Plain numbers
only, so that the data layer and the command line can read the table without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearnlm.errors import UserError

# Utility is a four-way multiple choice whose distractors are other G questions of the same task.
MIN_GENERAL_QUESTIONS_PER_TASK = 4


@dataclass(frozen=True)
class SizePreset:
    """Documents per task for each set; ``None`` takes every document of the source file.

    ``mia_docs`` caps the MIA members (the first Task3 documents of F) where validation forget has
    fewer unseen Task3 documents than F has members (``full``); ``None`` uses all of F's Task3 documents.
    ``general_questions`` is the fewest G questions per task the preset accepts.
    """

    name: str
    forget_docs: int | None
    retain_docs: int | None
    general_docs: int | None
    mia_docs: int | None = None
    general_questions: int = MIN_GENERAL_QUESTIONS_PER_TASK


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


@dataclass(frozen=True)
class Size:
    """One size: the documents its sets draw (``sets``) and how its base, target and oracle train."""

    sets: SizePreset
    recipe: Recipe

    @property
    def name(self) -> str:
        return self.sets.name


# For tests: small enough that the three models train in well under a minute.
MICRO_BASE = BaseRecipe("micro", vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                        lr=3e-3, epochs=1)
STANDARD_BASE = BaseRecipe("standard", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4,
                           intermediate_size=512, lr=2e-3, epochs=4)

SIZES: dict[str, Size] = {
    size.name: size
    for size in (
        # For tests only: one document per task everywhere, so it trains in seconds. Task1 and Task3
        # then have one G question each, and utility borrows distractors from the other tasks.
        Size(SizePreset("micro", forget_docs=1, retain_docs=1, general_docs=1, general_questions=1),
             Recipe(MICRO_BASE, lr=3e-3, batch_size=4, max_epochs=100, replay=0.25)),
        Size(SizePreset("mini", forget_docs=4, retain_docs=4, general_docs=4),
             Recipe(STANDARD_BASE, lr=3e-3, batch_size=4, max_epochs=80, replay=0.25)),
        # The benchmark: 12 MIA members against 12 nonmembers, the fewest for which a model that cannot
        # tell them apart (AUC 0.5) stays inside the oracle's bar of 0.6 with good odds (AUC spread
        # about 0.12). Validation forget has 34 unseen Task3 documents: draws 0 and 1 fit.
        Size(SizePreset("bench", forget_docs=12, retain_docs=12, general_docs=4),
             Recipe(STANDARD_BASE, lr=3e-3, batch_size=4, max_epochs=80, replay=0.25)),
        # Not tuned: every train document is beyond two CPU cores; meant for a GPU.
        Size(SizePreset("full", forget_docs=None, retain_docs=None, general_docs=None, mia_docs=34),
             Recipe(STANDARD_BASE, lr=1e-3, batch_size=8, max_epochs=60, replay=0.5)),
    )
}

RECIPES: dict[str, Recipe] = {name: size.recipe for name, size in SIZES.items()}


def get_size(size: str | Size) -> Size:
    """The size of that name (a ``Size`` is already one): where a size enters, it is resolved once."""
    if isinstance(size, Size):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}") from None
