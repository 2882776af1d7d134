"""The exceptions the CLI turns into a single stderr line: bad input (exit code 2) and Ctrl-C (130)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a wrong path, a malformed file, an invalid setting."""


class Interrupted(BaseException):
    """Ctrl-C, raised by the CLI's SIGINT handler. Not a ``KeyboardInterrupt``, which typer turns into
    a bare exit before the CLI can say what was kept; a ``BaseException``, so that no library's
    ``except Exception`` swallows it."""


def with_notes(err: BaseException, notes: list[str] | None = None) -> str:
    """The message of ``err`` followed by its notes (what a failed run kept, how to go on; or the
    ``notes`` given), in one line."""
    parts = [str(err), *(getattr(err, "__notes__", []) if notes is None else notes)]
    return " ".join("; ".join(part for part in parts if part).split())
