"""The ``collab_agent.cli`` package: every command group registered, the old module paths still
importing the same objects, the folded benchmarks runnable both ways, backends closed however a
command ends, and ``--help`` without the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_close_backends import Counting

ROOT = Path(__file__).resolve().parents[1]
FOLDED = ("stream-ttft", "soak-reliability", "gpu-smallkv-throughput")


def python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )


def test_the_old_module_paths_give_the_objects_of_the_new_ones() -> None:
    from collab_agent import calibrate_cli, cli, cli_options, doctor
    from collab_agent.cli import calibrate, evaluate, options, serve
    from collab_agent.cli import doctor as doctor_cli
    from collab_agent.evaluation import cli as evaluation_cli
    from collab_agent.serve import command, launch

    assert callable(cli.main) and cli.load_pair is cli.backends.load_pair
    assert calibrate_cli.register is calibrate.register
    assert cli_options.JsonOption is options.JsonOption
    assert evaluation_cli.register is evaluate.register
    assert evaluation_cli.default_out is evaluate.default_out
    assert command.serve_forever is launch.serve_forever
    assert command.register is serve.register and command.serve_command is serve.serve_command
    assert doctor.register is doctor_cli.register
    with pytest.raises(AttributeError, match="no_such_name"):
        evaluation_cli.no_such_name  # noqa: B018


def test_help_lists_every_group_and_loads_no_heavy_library() -> None:
    code = (
        "import sys, json\n"
        "from collab_agent.cli import app, bench_app, register_benchmarks\n"
        "assert len(app.registered_commands) == 6 and len(app.registered_groups) == 1\n"
        "register_benchmarks()\n"
        "assert len(bench_app.registered_commands) == 11\n"
        "heavy = ('torch', 'transformers', 'langchain_core', 'fastapi', 'uvicorn')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    done = python("-c", code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    root = python("-m", "collab_agent.cli", "--help")
    for group in ("run", "models", "eval", "calibrate", "doctor", "serve", "bench"):
        assert f" {group} " in root.stdout
    bench = python("-m", "collab_agent.cli", "bench", "--help")
    for name in ("prefix-reuse", "edge-cloud", "kv", "batch", "serve", *FOLDED):
        assert name in bench.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "collab_agent.cli", "bench", "soak-reliability", "--seconds", "0"],
        ["-m", "collab_agent.bench.soak_reliability", "--seconds", "60"],
    ],
)
def test_a_folded_benchmark_checks_its_options_both_ways(args: list[str]) -> None:
    done = python(*args)
    assert done.returncode == 2
    assert "--seconds" in done.stderr and "(0, 45]" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_folded_benchmark_keeps_its_options() -> None:
    done = python("-m", "collab_agent.cli", "bench", "gpu-smallkv-throughput", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--tiny", "--batch", "--prompt", "--decode", "--budget", "--methods"):
        assert option in done.stdout
    done = python("-m", "collab_agent.bench.stream_ttft", "--help")
    assert done.returncode == 0, done.stderr
    assert "--repeat" in done.stdout and "--threads" in done.stdout


def test_run_then_close_closes_the_backends_when_the_work_fails() -> None:
    from collab_agent.cli.backends import run_then_close

    small, large = Counting(), Counting()

    async def fails() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_then_close(fails, small, large, None)
    assert (small.closed, large.closed) == (1, 1)

    async def answers() -> int:
        return 4

    assert run_then_close(answers, small) == 4
    assert small.closed == 2


def test_each_benchmark_module_imports_first_in_a_fresh_process() -> None:
    """A benchmark imported before the command line (a test, ``python -m``) must not meet the
    command line registering it half-loaded."""
    code = (
        "import importlib, sys\n"
        "from collab_agent.cli.bench import BENCH_MODULES\n"
        "for name in BENCH_MODULES:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('collab_agent')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(f'collab_agent.bench.{name}').register\n"
        "print('ok')\n"
    )
    done = python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
