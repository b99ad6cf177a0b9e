"""The ``collab-agent`` command: one module per command group (`run`, `evaluate`, `calibrate`,
`doctor`, `serve`, `bench`), the options they share (`options`) and the loading and closing of
the model pair (`backends`).

Figures go to stdout (one JSON object with ``--json``); progress and logs go to stderr.
Heavy imports (torch, transformers) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from collab_agent.cli import bench, calibrate, doctor, evaluate, run, serve
from collab_agent.cli.backends import load_pair, run_then_close
from collab_agent.cli.bench import bench_app, register_benchmarks
from collab_agent.cli.entry import run_app

__all__ = ["app", "bench_app", "load_pair", "main", "register_benchmarks", "run_then_close"]

app = typer.Typer(
    name="collab-agent",
    help="A small model reasons; a large one steps in when a trigger fires (TrigReason).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for group in (run, evaluate, calibrate, doctor, serve, bench):  # the order of --help
    group.register(app)


def main() -> None:
    """Console-script entry point: typed errors become one clear line and exit code 2."""
    register_benchmarks()
    run_app(app)
