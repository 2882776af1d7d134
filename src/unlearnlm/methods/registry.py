"""The methods by name. Each method module registers itself here; ``methods/__init__`` imports them."""

from __future__ import annotations

from unlearnlm.errors import UserError
from unlearnlm.methods.base import Method

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
