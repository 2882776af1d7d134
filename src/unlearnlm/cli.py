"""The `unlearnlm` command line: target, unlearn, eval, demo, bench."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unlearnlm.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Remove chosen data from a language model and measure, with the SemEval-2025 metrics, that it is gone.",
)


# --- target (owned by the target helper) -------------------------------------------------------

# --- end target ----------------------------------------------------------------------------------


# --- eval (owned by the evaluation helper) -------------------------------------------------------

# --- end eval ------------------------------------------------------------------------------------


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
