"""Unlearning methods, registered by name. Adding one: a module with a loss and a ``register`` call."""

from __future__ import annotations

from unlearnlm.errors import UserError
from unlearnlm.methods.base import Method

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


# Importing the modules registers them.
from unlearnlm.methods import agad, ga, gd, kl, npo, simnpo, sugd  # noqa: E402,F401

__all__ = ["Method", "REGISTRY", "get_method", "register"]
