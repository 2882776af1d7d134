"""Where outputs may go: never onto, into or around anything a command reads. (Input models are
checked by ``unlearnlm.hub.resolve_model``.)

A command that replaces its output (``--overwrite``) removes the old one first; if that output held
an input (``--out D`` with the model in ``D/model``), the input would go with it. So every command
checks its output against all of its inputs before anything is written or removed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
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


def check_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a file, a non-empty directory unless ``overwrite``, and any overlap with ``inputs``."""
    out = Path(out)
    refuse_overlap(out, inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: directory is not empty (pass --overwrite to replace it)")
    return out


def replace_dir(new: Path, out: Path, aside: Path | None = None,
                on_stage: Callable[[str], None] | None = None) -> None:
    """Give the finished directory ``new`` the name ``out``, replacing what is there.

    The old ``out`` is renamed to ``aside`` before ``new`` takes its name and is removed only then, so
    ``out`` is never seen half-written and a kill leaves a whole directory at one of the names. By
    default ``aside`` lies in a fresh temporary directory beside ``out``, so that two processes
    replacing the same directory never share it. ``on_stage("aside")`` and ``on_stage("renamed")``
    run after each rename (the checkpoint swap flushes the parent directory and its kill tests pause
    there).
    """
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) if aside is None else None
    aside = holder / out.name if holder is not None else aside
    if aside.exists():
        shutil.rmtree(aside)
    if out.exists():
        out.rename(aside)
    if on_stage is not None:
        on_stage("aside")
    new.rename(out)
    if on_stage is not None:
        on_stage("renamed")
    shutil.rmtree(holder if holder is not None else aside, ignore_errors=True)
