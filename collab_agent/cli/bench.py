"""``collab-agent bench NAME``: the benchmarks of `collab_agent.bench`, one module each.

The modules are found by name and loaded by `register_benchmarks`, when the command line runs,
not when `collab_agent.cli` is imported: they import `collab_agent.cli.options`, so loading them
with the package would be an import cycle. Each one's ``register`` adds its command to the
``bench`` group.
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
    "kv_step",
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
    """Add the ``bench`` group to the app (its commands come with `register_benchmarks`)."""
    app.add_typer(bench_app, name="bench")


def register_benchmarks() -> None:
    """Add every benchmark of `BENCH_MODULES` to the ``bench`` group, once."""
    if not bench_app.registered_commands:
        for name in BENCH_MODULES:
            importlib.import_module(f"collab_agent.bench.{name}").register(bench_app)
