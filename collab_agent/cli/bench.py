"""``collab-agent bench NAME``: the benchmarks of `collab_agent.bench`, one module each.

The modules are found by name (they import `collab_agent.cli.options`, so the CLI does not
import them back at load time); each one's ``register`` adds its command to the ``bench`` group.
"""

from __future__ import annotations

import importlib

import typer

BENCH_MODULES = (
    "prefix_reuse",
    "edge_cloud",
    "kv",
    "kv_gsm8k",
    "kv_collab",
    "batch",
    "serve",
    "stream_ttft",
    "soak_reliability",
    "gpu_smallkv_throughput",
)
"""The modules of `collab_agent.bench` behind ``collab-agent bench``, in the order of its help."""

bench_app = typer.Typer(
    help="Benchmarks; each prints figures (one JSON object with --json).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group, with every benchmark of `BENCH_MODULES`, to the app."""
    for name in BENCH_MODULES:
        importlib.import_module(f"collab_agent.bench.{name}").register(bench_app)
    app.add_typer(bench_app, name="bench")
