"""``collab-agent doctor``: check that this machine can run the project, and say how to fix it
(the checks are `collab_agent.doctor`'s)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from collab_agent import doctor as checks


def register(app: typer.Typer) -> None:
    """Add the ``doctor`` command to the ``collab-agent`` app."""
    app.command("doctor")(doctor_command)


def doctor_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="Skip the sha256 of the bundled models (seconds).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Check this machine: Python, the venv, dependencies, bundled models, caches, disk.

    Exits with 1 when a check fails, each failure with the command that fixes it."""
    from rich.console import Console
    from rich.table import Table

    findings = checks.run_checks(verify=not quick)
    failed = [f for f in findings if not f.ok]
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(f) for f in findings]}))
    else:
        table = Table(title="collab-agent doctor", show_lines=False)
        for column in ("", "check", "seen", "fix"):
            table.add_column(column, overflow="fold")
        for f in findings:
            mark = "[green]ok[/]" if f.ok else "[red]FAIL[/]"
            table.add_row(mark, f.check, f.detail, f.fix or "")
        Console().print(table)
    if failed:
        raise typer.Exit(1)
