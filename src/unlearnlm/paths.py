"""Where outputs may go: never onto, into or around anything a command reads. (Input models are
checked by ``unlearnlm.hub.resolve_model``.)

A command that replaces its output (``--overwrite``) removes the old one first; if that output held
an input (``--out D`` with the model in ``D/model``), the input would go with it. So every command
checks its output against all of its inputs before anything is written or removed.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from unlearnlm.errors import UserError

# The files by which a directory is known as an unlearnlm output (unlearn, eval, audit, target, base,
# demo): ``--overwrite`` replaces only such a directory, never a folder of someone else's files.
OUTPUT_MARKERS = ("run.json", "evaluation_results.json", "receipt.json", "target.json", "base.json", "demo.json")


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


def resolved_output(out: str | Path) -> Path:
    """``out`` made absolute with its links followed; a link loop or an unreadable parent is one line."""
    if str(out) in ("", "."):
        raise UserError("--out is empty or '.': name a new directory for the output (an unset shell variable?)")
    try:
        return Path(out).expanduser().resolve(strict=False)
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop, before Python 3.13
        raise UserError(f"--out {out}: cannot be resolved ({err})") from None


def is_our_output(directory: Path) -> bool:
    """Whether ``directory`` holds an unlearnlm output (one model's, or a comparison's ``NAME/`` folders)."""
    places = [directory, *(child for child in directory.iterdir() if child.is_dir())]
    return any((place / marker).is_file() for place in places for marker in OUTPUT_MARKERS)


def refuse_unsafe_output(out: str | Path) -> Path:
    """Refuse an output that, replaced, would take what a user keeps: the current directory, the home
    directory, a filesystem root, or any directory holding one of them."""
    target = resolved_output(out)
    if target == target.parent:
        raise UserError(f"--out {out} is a filesystem root: name a new directory for the output")
    for name, place in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        place = place.resolve()
        if target == place or target in place.parents:
            raise UserError(f"--out {out} is {name} or holds it: name a new directory for the output")
    return target


def check_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an unsafe place (``refuse_unsafe_output``), a file, a non-empty directory unless it is
    an unlearnlm output and ``overwrite`` is given, and any overlap with ``inputs``."""
    target = refuse_unsafe_output(out)
    out = Path(out)
    refuse_overlap(out, inputs)
    try:
        if target.exists() and not target.is_dir():
            raise UserError(f"{out}: exists and is not a directory")
        holder = next(place for place in target.parents if place.exists())
        if not holder.is_dir():  # found now, not when the output is created after the work
            raise UserError(f"--out {out}: {holder} is a file, not a directory")
        if target.is_dir() and any(target.iterdir()):
            if not is_our_output(target):
                raise UserError(f"{out}: directory is not empty and holds no unlearnlm output "
                                "(no run.json or evaluation_results.json); choose another --out")
            if not overwrite:
                raise UserError(f"{out}: directory is not empty (pass --overwrite to replace it)")
    except OSError as err:
        raise UserError(f"--out {out}: cannot be read ({err.strerror or err})") from None
    return out


def claim_output(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``check_output_dir``, then this process's lock on the output (``lock_writer``) until it is
    released: what a command does before it writes."""
    out = check_output_dir(out, overwrite, inputs)
    lock_writer(resolved_output(out))
    return out


def claim_place(out: str | Path) -> Path:
    """``refuse_unsafe_output``, then the lock (``lock_writer``): for a command that keeps and reuses
    what it finds in its output (``bench`` resumes its finished runs). Returns the resolved output."""
    target = refuse_unsafe_output(out)
    lock_writer(target)
    return target


def lock_writer(target: Path) -> None:
    """``lock_output`` in the process that writes: under torchrun or accelerate launch only the first
    process writes, so only it holds the lock (the others would find it taken); RANK is read from the
    launcher before torch is imported."""
    if os.environ.get("RANK", "0") == "0":
        lock_output(target)


# --- one writer per output --------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # output directory -> descriptor of its lock file, for this process
_MADE: dict[Path, list[Path]] = {}  # output directory -> the missing parents its lock created, outermost first


def lock_path_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def lock_output(out_dir: Path) -> None:
    """Take the output's lock file (``.<name>.lock`` beside it, holding this process id) for as long
    as this process runs or until ``release_outputs``; a second run on the same output is refused.

    The lock is an ``flock`` on the file, which the system drops when its holder dies, so a lock file
    left by a killed run is taken over; the process id in it names the holder in the refusal.

    Parent directories that do not exist yet are made first, so that every run on the output meets
    at the same lock file from its start (a lock beside the nearest existing ancestor would change
    name once the parents exist, and two runs could each hold their own). The parents made here are
    removed again on release if the run left them empty (a refused or failed start writes nothing).
    """
    out_dir = out_dir.resolve()
    if out_dir in _HELD:
        return
    made = _make_parents(out_dir)
    try:
        _HELD[out_dir] = _take_lock(out_dir)
    except BaseException:
        _remove_empty(made)
        raise
    _MADE[out_dir] = made


def _make_parents(out_dir: Path) -> list[Path]:
    """Make ``out_dir``'s missing parents; return the ones this call made, outermost first."""
    missing = [place for place in (out_dir.parent, *out_dir.parent.parents) if not place.exists()][::-1]
    made = []
    for place in missing:
        try:
            place.mkdir()
        except FileExistsError:  # another run made it meanwhile: theirs, not ours to remove
            continue
        except OSError as err:
            _remove_empty(made)
            raise UserError(f"--out {out_dir}: cannot create its directory {place} ({err.strerror})") from None
        made.append(place)
    return made


def _remove_empty(made: list[Path]) -> None:
    """Remove the directories ``_make_parents`` made, innermost first, as long as they are empty."""
    for place in reversed(made):
        try:
            place.rmdir()
        except OSError:  # not empty (the run wrote there) or gone: keep the rest too
            return


def _take_lock(out_dir: Path) -> int:
    path = lock_path_for(out_dir)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"--out {out_dir}: cannot create its lock file {path} ({err.strerror})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(descriptor)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"--out {out_dir}: cannot lock {path} ({err.strerror})") from None
            raise UserError(f"--out {out_dir} is being written by another run (process {_holder(path)}, lock "
                            f"{path}); wait for it to end or choose another --out") from None
        # The holder before us may have removed the file between our open and our lock: lock the new one.
        if os.path.exists(path) and os.path.samestat(os.fstat(descriptor), os.stat(path)):
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def holds_output(out_dir: Path) -> bool:
    return out_dir.resolve() in _HELD


def release_output(out_dir: str | Path) -> None:
    """Drop this process's lock of ``out_dir``, if it holds one (the lock file is removed, then unlocked,
    then the parents its lock made, if they are empty)."""
    try:
        out_dir = Path(out_dir).expanduser().resolve()
    except (OSError, RuntimeError):  # a link loop was never locked
        return
    descriptor = _HELD.pop(out_dir, None)
    if descriptor is not None:
        lock_path_for(out_dir).unlink(missing_ok=True)
        os.close(descriptor)
        _remove_empty(_MADE.pop(out_dir, []))


def release_outputs() -> None:
    """Drop every output lock this process holds."""
    for out_dir in list(_HELD):
        release_output(out_dir)


atexit.register(release_outputs)


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


def write_aside(path: Path, text: str) -> None:
    """``path`` written whole or not at all: written beside it under this process's name, then
    renamed, so that a kill leaves the old file and processes sharing a directory never mix."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)
