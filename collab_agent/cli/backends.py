"""Loading the model pair for a command, and closing backends when the command ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from rich.console import Console

from collab_agent.backends.base import close_backends

T = TypeVar("T")

stderr = Console(stderr=True)


def load_pair(
    models: str | None,
    small: str | None,
    large: str | None,
    *,
    kv_method: str | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Load the (small, large) backends, showing progress on stderr while they load.

    ``kv_method`` (``"NAME"`` or ``"NAME:BUDGET"``, see `kv_method_for`) compresses the large
    model's KV cache; it is checked before any model loads."""
    from collab_agent.backends.specs import load_backend, resolve_pair

    small_spec, large_spec = resolve_pair(models, small, large)
    method = None if kv_method is None else check_kv_method(kv_method, small_spec, large_spec)
    backends: list[Any] = []
    for role, spec in (("small", small_spec), ("large", large_spec)):
        with stderr.status(f"Loading the {role} model [bold]{spec}[/] ..."):
            backends.append(load_backend(spec, **options))
        stderr.print(f"[green]loaded[/] {role}: {spec}")
    if method is not None:
        backends[1].use_kv_method(kv_method_for(*method, small=backends[0]))
        stderr.print(f"[green]large model's KV cache[/]: {kv_method}")
    return backends[0], backends[1]


def check_kv_method(kv_method: str, small_spec: str, large_spec: str) -> tuple[str, float | None]:
    """Read ``--kv-method`` (``NAME[:BUDGET]``) and check the pair can take it: the large model
    must run here (a server keeps its own cache), and SmallKV's small model too (it reads the
    small model's attention). Raises `ConfigError` naming ``--kv-method``."""
    from collab_agent.backends.specs import parse_spec, spec_kind
    from collab_agent.cache import METHODS
    from collab_agent.cache.budget import CacheConfigError
    from collab_agent.cache.named import needs_assistant, parse_method_spec
    from collab_agent.errors import ConfigError

    try:
        name, budget = parse_method_spec(kv_method)
    except CacheConfigError as exc:
        raise ConfigError("--kv-method", exc.problem) from None
    for role, spec, needed in (
        ("large", large_spec, True),
        ("small", small_spec, needs_assistant(METHODS[name])),
    ):
        if needed and spec_kind(parse_spec(spec)).server:
            raise ConfigError(
                "--kv-method",
                f"{name} needs a {role} model that runs in this process (bundled:, hf: or "
                f"tiny), got {spec!r}; a server keeps its own KV cache",
            )
    return name, budget


def kv_method_for(name: str, budget: float | None, *, small: Any) -> Any:
    """The KV method ``name`` at ``budget`` (its own default when ``None``), guided by the
    ``small`` backend when it needs a small model (SmallKV shares that backend's pass)."""
    from collab_agent.cache.named import make_method

    options = {} if budget is None else {"budget": budget}
    return make_method(name, assistant=small, **options)


def run_then_close(work: Callable[[], Awaitable[T]], *backends: object) -> T:
    """Run ``work`` in a new event loop and close ``backends`` (``None`` skipped) when it ends,
    however it ends: the end of every command that loaded models."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await close_backends(*backends)

    return anyio.run(main)
