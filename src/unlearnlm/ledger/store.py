"""A ledger on disk: its layout, its genesis file, the hash chain, the lock, recovery and ``verify``.

::

    L/ledger.json                      genesis: the original model (by path and weight hashes), R, U, G, settings
    L/requests/0001/receipt.json       one directory per request, committed by one rename
    L/requests/0001/receipt.md
    L/requests/0001/forget_reference.json   where the forget set was read (a locator, outside the chain)
    L/requests/0003/model/             the model request 3 made: the current one (earlier ones only with keep_models)
    L/.pending/                        the request being added: its unlearning run (resumable) and receipt

Receipt n names the sha256 of receipt n-1's file (of ``ledger.json`` for the first), so editing,
removing or reordering a request breaks the chain. A request directory appears in one rename, with
its receipt and model inside, so a kill leaves the ledger at its previous state or at the next one,
never between; the earlier model is removed only after that rename, and a leftover is removed when
the ledger is next opened for writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from unlearnlm.data.records import content_sha256
from unlearnlm.errors import UserError
from unlearnlm.hub import weights_sha256
from unlearnlm.paths import lock_output, release_output

GENESIS = "ledger.json"
REQUESTS = "requests"
PENDING = ".pending"
RECEIPT_JSON = "receipt.json"
RECEIPT_MD = "receipt.md"
REFERENCE = "forget_reference.json"
MODEL = "model"
DISCARDED = ".model.discarded"  # an earlier model on its way out: renamed first, then removed
FORMAT = "unlearnlm-ledger/1"
GENESIS_KEYS = ("original", "retain", "unseen", "general", "keep_models", "evaluation")  # what the commands read


class LedgerMismatch(UserError):
    """A hash that ``verify`` recomputed differs from the one recorded (the message names which)."""


@dataclass(frozen=True)
class Ledger:
    """An opened ledger: its directory and genesis record."""

    root: Path
    genesis: dict

    @property
    def requests_dir(self) -> Path:
        return self.root / REQUESTS

    @property
    def pending_dir(self) -> Path:
        return self.root / PENDING

    def request_dir(self, number: int) -> Path:
        return self.requests_dir / f"{number:04d}"

    def count(self) -> int:
        """The number of committed requests (the highest request directory)."""
        numbers = request_numbers(self.root)
        return numbers[-1] if numbers else 0

    def receipt(self, number: int) -> dict:
        return read_json(self.request_dir(number) / RECEIPT_JSON)

    def receipts(self) -> list[dict]:
        return [self.receipt(number) for number in range(1, self.count() + 1)]

    def current_model(self) -> Path:
        """The model the next request unlearns from: the last request's, or the original one."""
        count = self.count()
        return self.request_dir(count) / MODEL if count else Path(self.genesis["original"]["path"])

    def current_weights(self) -> dict[str, str]:
        count = self.count()
        return self.receipt(count)["weights_sha256"]["after"] if count else self.genesis["original"]["weights_sha256"]

    def last_receipt_sha256(self) -> str:
        """What the next receipt chains to: the last receipt file's sha256, or the genesis file's."""
        count = self.count()
        return content_sha256(self.request_dir(count) / RECEIPT_JSON if count else self.root / GENESIS)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LedgerMismatch(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LedgerMismatch(f"{path}: unreadable ({err})") from None
    if not isinstance(value, dict):
        raise LedgerMismatch(f"{path}: not a JSON object (a {type(value).__name__})")
    return value


def self_sha256(receipt: dict) -> str:
    """sha256 of a receipt's canonical JSON without its own ``self_sha256``: an edit of the last
    receipt, which no later one chains to, still shows."""
    body = {key: value for key, value in receipt.items() if key != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_json(data: dict, path: Path) -> None:
    """Written aside, flushed and renamed: a kill never leaves half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def is_request_name(name: str) -> bool:
    """``0001``, ``0002``, ...: the names ``Ledger.request_dir`` gives (not ``1``, ``00001`` or ``0000``)."""
    return name.isdecimal() and int(name) > 0 and name == f"{int(name):04d}"


def request_numbers(root: Path) -> list[int]:
    directory = root / REQUESTS
    if not directory.is_dir():
        return []
    return sorted(int(entry.name) for entry in directory.iterdir() if entry.is_dir() and is_request_name(entry.name))


def open_ledger(root: str | Path) -> Ledger:
    root = Path(root)
    if not (root / GENESIS).is_file():
        raise UserError(f"{root}: not a ledger (no {GENESIS}; create one with `unlearnlm ledger init`)")
    genesis = read_json(root / GENESIS)
    if genesis.get("format") != FORMAT:
        raise UserError(f"{root / GENESIS}: not a ledger of this version (format {genesis.get('format')!r})")
    missing = [key for key in GENESIS_KEYS if key not in genesis]
    if missing:
        raise LedgerMismatch(f"{root / GENESIS}: no {', '.join(missing)} (the file was edited)")
    return Ledger(root, genesis)


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """One writer per ledger: the output lock of ``paths.lock_output`` (an ``flock`` on ``.<L>.lock``
    beside the ledger, which the system drops when its holder dies, so a lock left by a killed ``add``
    is taken over); a second writer is refused at once, naming the holder's process."""
    root.mkdir(parents=True, exist_ok=True)
    lock_output(root)
    try:
        yield
    finally:
        release_output(root)


def remove_earlier_models(ledger: Ledger) -> None:
    """Without ``keep_models``, only the current model stays: an earlier one still holds what later
    requests removed. Each goes by a rename first, so a kill never leaves half a model under ``model/``."""
    count = ledger.count()
    for number in range(1, count + 1):
        directory = ledger.request_dir(number)
        if number < count and not ledger.genesis["keep_models"] and (directory / MODEL).exists():
            (directory / MODEL).rename(directory / DISCARDED)
        shutil.rmtree(directory / DISCARDED, ignore_errors=True)


def commit(ledger: Ledger, staged: Path, number: int) -> None:
    """Publish a staged request directory (receipt and model inside) as request ``number``."""
    ledger.requests_dir.mkdir(exist_ok=True)
    descriptor = os.open(staged, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    staged.rename(ledger.request_dir(number))
    remove_earlier_models(ledger)


def receipts(root: str | Path) -> list[dict]:
    """Every receipt of the ledger at ``root``, in request order (what ``ledger show`` prints)."""
    return open_ledger(root).receipts()


# --- verify -----------------------------------------------------------------------------------------

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LedgerMismatch(message)


def _check_weights(directory: Path, recorded: dict[str, str], what: str) -> None:
    _check(directory.is_dir(), f"{directory}: {what} is missing")
    found = weights_sha256(directory)
    for name in sorted(set(recorded) | set(found)):
        _check(found.get(name) == recorded.get(name),
               f"{directory / name}: sha256 {found.get(name, 'missing')} differs from {what}'s recorded "
               f"{recorded.get(name, 'none')}")


def verify(root: str | Path) -> dict:
    """Recompute every hash of the ledger; raise ``LedgerMismatch`` naming the first mismatch.

    Checked, in order: the original model's weights; the request directories are numbered 1..N
    without a gap; each receipt matches its own ``self_sha256`` and names its own number, the sha256
    of the file before it in the chain, the weights before it as the weights after the previous
    request, and the sha256 of its ``receipt.md``; every kept model matches the weights its receipt
    names; the current model exists and matches. Returns ``{"requests": N, "head": last receipt sha256, "current_model": path}``.
    """
    ledger = open_ledger(root)
    original = ledger.genesis["original"]
    _check_weights(Path(original["path"]), original["weights_sha256"], "the original model")
    requests = ledger.requests_dir
    _check(requests.is_dir() or not requests.exists(), f"{requests}: not a directory")
    for entry in sorted(requests.iterdir()) if requests.is_dir() else ():
        if entry.name.startswith("."):  # a file manager's or an editor's (.DS_Store, .nfs...): not a request's
            continue
        _check(entry.is_dir() and is_request_name(entry.name),
               f"{entry}: not a request directory (requests are directories named 0001, 0002, ...)")
    numbers = request_numbers(ledger.root)
    for expected, number in enumerate(numbers, start=1):
        _check(number == expected, f"{ledger.request_dir(expected)}: request {expected} is missing "
                                   f"(requests {', '.join(map(str, numbers))} are there)")
    chained, weights = content_sha256(ledger.root / GENESIS), original["weights_sha256"]
    for number in numbers:
        directory = ledger.request_dir(number)
        receipt = read_json(directory / RECEIPT_JSON)
        where = directory / RECEIPT_JSON
        _check(receipt.get("self_sha256") == self_sha256(receipt),
               f"{where}: its content differs from its self_sha256 (the receipt was edited)")
        _check(receipt.get("request") == number, f"{where}: names request {receipt.get('request')}, not {number}")
        _check(receipt.get("previous_receipt_sha256") == chained,
               f"{where}: previous_receipt_sha256 {receipt.get('previous_receipt_sha256')} differs from the sha256 "
               f"{chained} of the file before it")
        _check(receipt.get("weights_sha256", {}).get("before") == weights,
               f"{where}: the weights before it differ from the weights after request {number - 1}")
        markdown = directory / RECEIPT_MD
        _check(markdown.is_file() and content_sha256(markdown) == receipt.get("receipt_md_sha256"),
               f"{markdown}: missing or its sha256 differs from the one in {RECEIPT_JSON}")
        weights = receipt["weights_sha256"]["after"]
        if (directory / MODEL).exists() or number == numbers[-1]:
            _check_weights(directory / MODEL, weights, f"request {number}'s model")
        chained = content_sha256(where)
    return {"requests": len(numbers), "head": chained, "current_model": str(ledger.current_model())}
