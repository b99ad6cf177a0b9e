"""The backends a chat model builds from spec strings: local models loaded once per process,
servers built per chat model and owned (closed) by it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import SecretStr

from collab_agent.backends.base import Backend

__all__ = ["LOCAL_BACKENDS", "OwnedBackends", "spec_backend"]

LOCAL_BACKENDS: dict[tuple[str, str], Backend] = {}
"""Local models (``bundled:``, ``hf:``, ``tiny``, ``llamacpp:``) by spec and options: loaded once
per process, as their weights are large. They hold no secret and no per-loop connection. Servers
(``openai:``) are built per chat model instead, which owns and closes them."""
_LOCAL_BACKENDS_LOCK = threading.Lock()


class OwnedBackends:
    """The servers a chat model built from its spec strings, by role. A deep copy of the model
    (``copy.deepcopy``, ``model_copy(deep=True)``) starts with none and builds its own."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, object]) -> OwnedBackends:
        return OwnedBackends()

    def methods(self, name: str) -> list[Callable[[], Any]]:
        """The method ``name`` (``close``, ``aclose``) of each backend built so far that has
        one."""
        with self.lock:
            found = [getattr(backend, name, None) for backend in self.backends.values()]
        return [method for method in found if callable(method)]


def spec_backend(
    spec: str,
    role: str,
    owned: OwnedBackends,
    *,
    backend_options: Mapping[str, Any],
    max_retries: int,
    timeout: float | None,
    api_key: SecretStr | None,
) -> Backend:
    """The backend ``spec`` names for ``role``: one its kind does not share (``openai:``,
    `Kind.shared`) built once into ``owned``, with ``api_key`` when given; a shared one (a local
    model, a llama.cpp server) loaded once per process. Server kinds (`Kind.server`) get
    ``max_retries`` and ``timeout / (max_retries + 1)`` per request unless the options say."""
    from collab_agent.backends.specs import load_backend, parse_spec, spec_kind

    parsed = parse_spec(spec)
    kind = spec_kind(parsed)
    options = dict(backend_options)
    if kind.server:
        options.setdefault("max_retries", max_retries)
        if timeout is not None:
            options.setdefault("timeout", timeout / (options["max_retries"] + 1))
    if not kind.shared:
        with owned.lock:
            if role not in owned.backends:
                secret = None if api_key is None else api_key.get_secret_value()
                owned.backends[role] = load_backend(parsed, api_key=secret, **options)
            return owned.backends[role]
    key = (str(parsed), json.dumps(options, sort_keys=True, default=repr))
    with _LOCAL_BACKENDS_LOCK:
        if key not in LOCAL_BACKENDS:
            LOCAL_BACKENDS[key] = load_backend(parsed, **options)
        return LOCAL_BACKENDS[key]
