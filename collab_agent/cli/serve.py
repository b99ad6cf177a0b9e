"""``collab-agent serve``: load the pair once, serve the configured policies over HTTP.

SIGTERM (or Ctrl-C) stops accepting, lets requests in flight finish for ``--grace`` seconds,
cancels the rest, then frees the models (`collab_agent.serve.launch`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from collab_agent import defaults
from collab_agent.cli.options import (
    ApiKeyEnvOption,
    LargeOption,
    ModelsOption,
    SmallOption,
    ThreadsOption,
)
from collab_agent.serve.config import LOOPBACK_HOSTS, ServeConfig
from collab_agent.serve.launch import load_policies, load_served_pair, serve_forever, stderr

DEFAULT_POLICIES = ("trigreason", "large-only", "small-only")


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``collab-agent`` app."""
    app.command("serve")(serve_command)


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
    api_key_env: ApiKeyEnvOption = "OPENAI_API_KEY",
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
