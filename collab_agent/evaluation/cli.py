"""Deprecated home of ``collab-agent eval``: the command is `collab_agent.cli.evaluate`."""

from __future__ import annotations

import importlib
from typing import Any

_MOVED = ("DEFAULT_POLICIES", "default_out", "eval_command", "register")


def __getattr__(name: str) -> Any:
    # looked up on use: a module-level import would make the evaluation and cli packages import
    # each other
    if name in _MOVED:
        return getattr(importlib.import_module("collab_agent.cli.evaluate"), name)
    raise AttributeError(f"module 'collab_agent.evaluation.cli' has no attribute {name!r}")
