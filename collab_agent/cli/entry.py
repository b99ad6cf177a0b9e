"""Running a typer app as a command: a typed error becomes one clear line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from collab_agent.errors import CollabError


def run_app(app: typer.Typer) -> None:
    """Run ``app`` on this process's arguments; a `CollabError` prints ``error: ...`` on stderr
    and exits with code 2, without a traceback."""
    try:
        app()
    except CollabError as error:
        Console(stderr=True).print(f"[red]error:[/] {error}")
        sys.exit(2)


def run_alone(command: Callable[..., Any]) -> None:
    """Run one command function as a whole program (``python -m collab_agent.bench.NAME``)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    run_app(app)
