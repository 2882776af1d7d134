"""`unlearnlm ledger init|add|verify|show`: the ledger's commands (``cli.py`` mounts this sub-app).

Nothing heavy is imported here at module level: the command line starts fast, and bad input fails
before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ledger_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Deletion requests over time: unlearn each on the current model, re-check every earlier one, "
         "chain the receipts (docs/ledger.md).",
)

LedgerDir = Annotated[Path, typer.Argument(help="The ledger directory.")]


@ledger_app.command("init")
def init_command(
    model: Annotated[str, typer.Option(help="The model to start from: a directory or Hub id. Only read; "
                                            "referenced by path and weight hashes, never copied.")],
    retain: Annotated[Path, typer.Option(help="Retain rows R: what every request trains to keep, and the drift is "
                                              "measured on.")],
    unseen: Annotated[Path, typer.Option(help="Documents the model never saw (U): the MIA's nonmembers.")],
    out: Annotated[Path, typer.Option(help="The ledger directory to create (must be empty or absent).")],
    utility: Annotated[Optional[Path], typer.Option(help="General set G (rows): the utility score and its drift.")] = None,
    keep_models: Annotated[bool, typer.Option(
        help="Keep every earlier model. A kept model still holds the data later requests removed.")] = False,
    text_key: Annotated[str, typer.Option(help="The text field of raw-document rows.")] = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of generation and scoring.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length limit of the scoring.")] = 256,
) -> None:
    """Start a ledger for MODEL: record its weight hashes and its retain and utility scores."""
    from unlearnlm.ledger.requests import init_ledger

    genesis = init_ledger(model, retain, unseen, out, utility=utility, keep_models=keep_models, text_key=text_key,
                          batch_size=batch_size, max_new_tokens=max_new_tokens)
    typer.echo(f"ledger {out}: original model {genesis['original']['spec']}, retain score "
               f"{genesis['original_scores']['retain_score']:.3f}", err=True)


@ledger_app.command("add")
def add_command(
    ledger: LedgerDir,
    forget: Annotated[Path, typer.Option(help="The request's forget rows (a file, directory or Hub split). Referenced "
                                              "by path and sha256; the ledger keeps no copy.")],
    config: Annotated[str, typer.Option(
        help="auto (calibrated on the current model with the ledger's unseen documents; its verdict goes in the "
             "receipt), or an unlearning preset or YAML file.")] = "auto",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value (repeatable).")] = None,
    recalibrate: Annotated[bool, typer.Option(
        help="auto: probe the learning rate again instead of reusing the rate the ledger's last calibration "
             "probed.")] = False,
    redact: Annotated[bool, typer.Option(
        "--redact/--no-redact", help="Keep the forget rows out of the receipt (sha256 and count only).")] = True,
) -> None:
    """Unlearn FORGET from the ledger's current model, make the result current, write the receipt."""
    from unlearnlm.ledger.requests import add_request
    from unlearnlm.ledger.store import RECEIPT_MD, open_ledger

    receipt = add_request(ledger, forget, config, overrides=list(set_ or []), recalibrate=recalibrate, redact=redact,
                          log=lambda message: typer.echo(message, err=True))
    number = receipt["request"]
    typer.echo(f"request {number}: forget score {receipt['scores']['own']['forget_score']:.3f}, "
               f"retain drift {receipt['drift']['retain_score']['change']:+.3f} -> "
               f"{open_ledger(ledger).request_dir(number) / RECEIPT_MD}", err=True)


@ledger_app.command("verify")
def verify_command(ledger: LedgerDir) -> None:
    """Recompute every hash; exit 0, or exit 2 with one line naming the first mismatch."""
    from unlearnlm.ledger.store import verify

    result = verify(ledger)
    count = result["requests"]
    typer.echo(f"ok: {count} request{'' if count == 1 else 's'}, chain head {result['head']}, current model "
               f"{result['current_model']}")


@ledger_app.command("show")
def show_command(ledger: LedgerDir) -> None:
    """Print the table of requests (markdown)."""
    from unlearnlm.evaluation.report import markdown_table
    from unlearnlm.ledger.receipt import show_rows
    from unlearnlm.ledger.store import open_ledger

    opened = open_ledger(ledger)
    headers, rows = show_rows(opened.receipts())
    typer.echo(f"{ledger}: {len(rows)} requests; current model {opened.current_model()}\n")
    typer.echo(markdown_table(headers, rows))
