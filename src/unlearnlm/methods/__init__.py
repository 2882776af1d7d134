"""Unlearning methods, registered by name. Adding one: a module with a loss and a ``register`` call."""

from __future__ import annotations

from unlearnlm.errors import UserError
from unlearnlm.methods.base import Batch, Method

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name; a second method of the same name is refused, never overwrites."""
    if method.name in REGISTRY:
        raise UserError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


# Importing the modules registers them.
from unlearnlm.methods import agad, ga, gd, kl, npo, rmu, simnpo, sugd  # noqa: E402,F401

__all__ = ["Batch", "Method", "REGISTRY", "get_method", "register"]
