"""KV methods by name: ``"smallkv"``, ``"h2o:0.25"``, as the command line and the benches give them."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from collab_agent.cache.budget import CacheConfigError
from collab_agent.cache.method import KVMethod


def needs_assistant(method: type[KVMethod]) -> bool:
    """Whether ``method`` is guided by a small model (it has an ``assistant`` field: SmallKV)."""
    return any(f.name == "assistant" for f in fields(method))


def make_method(name: str, *, assistant: Any = None, **options: Any) -> KVMethod:
    """The method registered as ``name`` in `collab_agent.cache.METHODS`, built with
    ``options``; a method guided by a small model gets ``assistant``."""
    from collab_agent.cache import METHODS

    if name not in METHODS:
        raise CacheConfigError("method", f"unknown {name!r}; choose from {', '.join(METHODS)}")
    method = METHODS[name]
    if needs_assistant(method):
        if assistant is None:
            raise CacheConfigError("assistant", f"{name} needs the small model that guides it")
        options["assistant"] = assistant
    return method(**options)


def parse_method_spec(spec: str) -> tuple[str, float | None]:
    """``"NAME"`` or ``"NAME:BUDGET"`` as (name, budget or ``None``), checked against
    `collab_agent.cache.METHODS` and the budget's range."""
    from collab_agent.cache import METHODS
    from collab_agent.cache.budget import check_budget

    name, sep, budget_text = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise CacheConfigError(
            "kv method", f"unknown {name!r} in {spec!r}; choose from {', '.join(METHODS)}"
        )
    if not sep:
        return name, None
    try:
        budget = float(budget_text)
    except ValueError:
        raise CacheConfigError(
            "kv method", f"budget {budget_text!r} in {spec!r} is not a number"
        ) from None
    return name, check_budget(budget)


def describe_method(method: KVMethod | None) -> str | None:
    """A short, stable text for ``method``: its class and the settings that differ from the
    defaults (no model objects), e.g. ``"SmallKV(budget=0.25)"``; ``None`` for no method."""
    from dataclasses import MISSING

    if method is None:
        return None
    changed = []
    for f in fields(method):
        if not f.init or f.name == "assistant":
            continue
        value = getattr(method, f.name)
        default = f.default
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        if default is MISSING or value != default:
            changed.append(f"{f.name}={value!r}")
    return f"{type(method).__name__}({', '.join(changed)})"
