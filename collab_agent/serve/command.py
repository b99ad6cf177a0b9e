"""Deprecated home of the ``serve`` command: the command is `collab_agent.cli.serve`, the
helpers that start a server `collab_agent.serve.launch`; both keep importing from here."""

from __future__ import annotations

import importlib
from typing import Any

from collab_agent.serve.launch import (
    load_policies,
    load_served_backend,
    load_served_pair,
    serve_forever,
)

__all__ = ["load_policies", "load_served_backend", "load_served_pair", "serve_forever"]

_FROM_CLI = ("DEFAULT_POLICIES", "register", "serve_command")


def __getattr__(name: str) -> Any:
    # looked up on use: a module-level import would make the serve and cli packages import
    # each other
    if name in _FROM_CLI:
        return getattr(importlib.import_module("collab_agent.cli.serve"), name)
    raise AttributeError(f"module 'collab_agent.serve.command' has no attribute {name!r}")
