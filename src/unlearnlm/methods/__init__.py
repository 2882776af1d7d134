"""Unlearning methods, registered by name. Adding one: a module with a loss and a ``register`` call,
imported below (docs/extending.md)."""

from unlearnlm.methods import agad, ga, gd, kl, npo, rmu, simnpo, sugd  # noqa: F401  (importing registers them)
from unlearnlm.methods.base import Batch, Method
from unlearnlm.methods.registry import REGISTRY, get_method, register

__all__ = ["Batch", "Method", "REGISTRY", "get_method", "register"]
