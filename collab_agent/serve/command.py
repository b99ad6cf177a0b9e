"""``collab-agent serve``: load the pair once, serve the configured policies over HTTP.

Concurrent requests share the loaded models: local transformers models through the batching
backend, a ``llamacpp:`` server through its parallel slots, remote ``openai:`` servers as they
are. SIGTERM (or Ctrl-C) stops accepting, lets requests in flight finish for ``--grace``
seconds, cancels the rest, then frees the models.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from collab_agent import defaults
from collab_agent.cli_options import LargeOption, ModelsOption, SmallOption, ThreadsOption
from collab_agent.policies.base import Policy
from collab_agent.serve.config import LOOPBACK_HOSTS, ServeConfig

stderr = Console(stderr=True)

DEFAULT_POLICIES = ("trigreason", "large-only", "small-only")


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
    slots, a local transformers model batching that many, a remote server as it is."""
    from collab_agent.backends.specs import load_backend, parse_spec

    parsed = parse_spec(spec)
    options: dict[str, Any] = {"threads": threads, "api_key_env": api_key_env}
    if parsed.kind == "llamacpp":
        options["parallel"] = parallel
    elif parsed.kind in ("bundled", "hf", "tiny"):
        options["max_batch_size"] = parallel
    return load_backend(parsed, **options)


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


def serve_command(
    models: ModelsOption = None,
    small: SmallOption = None,
    large: LargeOption = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help="A policy to serve (repeat for more): a registry name or a calibrated policy "
            "file. Clients pick one with the request's model field. Default: trigreason, "
            "large-only, small-only."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="File of accepted bearer keys, one per line.")
    ] = None,
    api_keys_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding accepted keys, comma-separated."),
    ] = None,
    max_in_flight: Annotated[int, typer.Option(help="Conversations reasoning at once.")] = 64,
    max_queued: Annotated[
        int, typer.Option(help="Requests waiting beyond those (then 429).")
    ] = 256,
    max_per_key: Annotated[int, typer.Option(help="One key's requests at once (then 429).")] = 32,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (then 413).")] = 1 << 20,
    parallel: Annotated[
        int, typer.Option(help="Conversations each local model decodes together (batch/slots).")
    ] = 8,
    grace: Annotated[
        float, typer.Option(help="Seconds requests in flight may finish after SIGTERM.")
    ] = 30.0,
    on_large_unavailable: Annotated[
        str, typer.Option(help="fail (answer 503) or degrade (the small model writes).")
    ] = "fail",
    temperature: Annotated[
        float, typer.Option(help="Default when a request sets none.")
    ] = defaults.TEMPERATURE,
    reasoning_budget: Annotated[
        int, typer.Option(help="Most reasoning tokens a request.")
    ] = defaults.REASONING_BUDGET,
    priming: Annotated[int, typer.Option(help="TrigReason's priming steps.")] = 1,
    threads: ThreadsOption = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the key of openai: specs.")
    ] = "OPENAI_API_KEY",
) -> None:
    """Serve the collaboration behind an OpenAI-compatible HTTP API (/v1/chat/completions)."""
    from collab_agent.serve.app import create_app
    from collab_agent.serve.auth import load_keys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keys = load_keys(api_keys_file, api_keys_env)
    config = ServeConfig(
        policies=load_policies(list(policy or DEFAULT_POLICIES), priming),
        api_keys=keys,
        host=host,
        max_in_flight=max_in_flight,
        max_queued=max_queued,
        max_per_key=max_per_key,
        max_body_bytes=max_body_bytes,
        grace_s=grace,
        temperature=temperature,
        reasoning_budget=reasoning_budget,
        on_large_unavailable=on_large_unavailable,  # type: ignore[arg-type]
    )
    if not keys:
        stderr.print(
            f"[bold red]WARNING: no API keys: anyone who can reach {host}:{port} can use this "
            "server.[/] Allowed only on loopback; give --api-keys-file or --api-keys-env to "
            "require keys."
        )
    assert host in LOOPBACK_HOSTS or keys  # ServeConfig refused the other case
    small_backend, large_backend = load_served_pair(
        models, small, large, parallel=parallel, threads=threads, api_key_env=api_key_env
    )
    app = create_app(config, small_backend, large_backend)
    stderr.print(
        f"serving {sorted(config.policies)} at http://{host}:{port}/v1 "
        f"({len(keys)} API key(s); SIGTERM drains for {grace:.0f}s)"
    )
    serve_forever(app, host, port, grace)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``collab-agent`` app."""
    app.command("serve")(serve_command)
