"""Where outputs may go, never onto, into or around anything a command reads; and whether an
input model directory is one.

A command that replaces its output (``--overwrite``) removes the old one first; if that output held
an input (``--out D`` with the model in ``D/model``), the input would go with it. So every command
checks its output against all of its inputs before anything is written or removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from unlearnlm.errors import UserError


def partial_dir_for(out_dir: Path) -> Path:
    """The temporary directory a run writes into before it is renamed to ``out_dir``."""
    return out_dir.parent / f".{out_dir.name}.partial"


def overlaps(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other (symlinks resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def refuse_overlap(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that equals, contains or lies inside an input, with or without --overwrite.

    The run's temporary directory beside ``out`` is checked as well: it is created and removed too.
    """
    out = Path(out)
    written = (out, partial_dir_for(out.resolve()))
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        if any(overlaps(place, source) for place in written):
            raise UserError(f"--out {out} overlaps the input {source}: choose an output directory "
                            "that neither contains nor lies inside any input")


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def check_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a file, a non-empty directory unless ``overwrite``, and any overlap with ``inputs``."""
    out = Path(out)
    refuse_overlap(out, inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: directory is not empty (pass --overwrite to replace it)")
    return out
