"""Deletion requests over time: a ledger that unlearns each request from the current model, re-scores
every earlier request on the result, and chains the receipts by sha256 (docs/ledger.md).

``init`` starts a ledger, ``add`` unlearns one request and writes its receipt, ``verify`` recomputes
every hash (raising ``LedgerMismatch`` at the first that differs), ``show`` returns the receipts.
They load on first use, so that the command line stays fast.
"""

from importlib import import_module

_EXPORTS = {"init": ("requests", "init_ledger"), "add": ("requests", "add_request"), "show": ("store", "receipts"),
            "verify": ("store", "verify"), "LedgerMismatch": ("store", "LedgerMismatch")}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(import_module(f"{__name__}.{module}"), attribute)
