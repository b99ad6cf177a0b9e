"""Starting a server: the policies it serves, the pair loaded once for concurrent requests,
and uvicorn until SIGTERM (`collab_agent.cli.serve` is the command that uses them).

Concurrent requests share the loaded models: local transformers models through the batching
backend, a ``llamacpp:`` server through its parallel slots, remote ``openai:`` servers as they
are. SIGTERM (or Ctrl-C) stops accepting, lets requests in flight finish for ``--grace``
seconds, cancels the rest, then frees the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from collab_agent.policies.base import Policy

stderr = Console(stderr=True)


def load_policies(names: list[str], priming: int) -> dict[str, Policy]:
    """Policies by the name clients give as ``model``: a registry name, or a calibrated
    policy file served under its file stem. Code (``module:factory``) is the operator's own
    choice here, never a request's."""
    from collab_agent.policies.registry import resolve_policy

    policies: dict[str, Policy] = {}
    for name in names:
        options: dict[str, Any] = {"priming_steps": priming} if name == "trigreason" else {}
        policy = resolve_policy(name, allow_code=True, **options)
        served = Path(name).stem if name.endswith(".json") else name
        policies[served] = policy
    return policies


def load_served_pair(
    models: str | None,
    small: str | None,
    large: str | None,
    *,
    parallel: int,
    threads: int | None,
    api_key_env: str,
) -> tuple[Any, Any]:
    """The (small, large) backends, each set up for ``parallel`` conversations at once."""
    from collab_agent.backends.specs import resolve_pair

    backends = []
    for role, spec in zip(("small", "large"), resolve_pair(models, small, large), strict=True):
        with stderr.status(f"Loading the {role} model [bold]{spec}[/] ..."):
            backends.append(load_served_backend(spec, parallel, threads, api_key_env))
        stderr.print(f"[green]loaded[/] {role}: {spec}")
    return backends[0], backends[1]


def load_served_backend(spec: str, parallel: int, threads: int | None, api_key_env: str) -> Any:
    """One backend for ``parallel`` conversations at once: a llama.cpp server with that many
    slots (``parallel``), a local model of a kind that batches (`Kind.batches`) batching that
    many, a remote server as it is."""
    from collab_agent.backends.specs import load_backend, parse_spec, spec_kind

    parsed = parse_spec(spec)
    options: dict[str, Any] = {"threads": threads, "api_key_env": api_key_env}
    if spec_kind(parsed).batches:
        options["max_batch_size"] = parallel
    return load_backend(parsed, parallel=parallel, **options)


def serve_forever(app: Any, host: str, port: int, grace_s: float) -> None:
    """Run ``app`` under uvicorn until SIGTERM / SIGINT, then shut down gracefully."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=int(grace_s) + 5,
        log_level="info",
        access_log=False,
    )
    uvicorn.Server(config).run()
