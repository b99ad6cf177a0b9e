"""``collab-agent serve`` and ``collab-agent bench serve`` run as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import pytest
from serve_harness import free_port
from servers import wait_until
from test_cli import collab_agent


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["serve", "--models", "tiny", "--host", "0.0.0.0"], "without API keys"),
        (["serve", "--models", "tiny", "--api-keys-env", "COLLAB_NO_SUCH_VAR"], "not set"),
        (["serve", "--models", "tiny", "--policy", "no-such-policy"], "policy"),
        (["bench", "serve", "--models", "tiny", "--clients", "0"], "--clients"),
    ],
)
def test_bad_serve_arguments_give_one_clear_line_and_exit_code_2(
    args: list[str], fragment: str
) -> None:
    done = collab_agent(*args)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # loads the tiny pair in a fresh interpreter
def test_serve_command_on_tiny_models_answers_and_stops_on_sigterm(tmp_path) -> None:
    import os
    import sys

    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line\nsk-test-key\n")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collab_agent.cli",
            "serve",
            "--models",
            "tiny",
            "--port",
            str(port),
            "--api-keys-file",
            str(keys),
            "--reasoning-budget",
            "8",
            "--grace",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    root = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(root + "/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, within_s=120), "the server did not become healthy"
        reply = httpx.post(
            root + "/v1/chat/completions",
            json={
                "model": "trigreason",
                "messages": [{"role": "user", "content": "2+2?"}],
                "max_tokens": 4,
            },
            headers={"Authorization": "Bearer sk-test-key"},
            timeout=120,
        )
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    finally:
        process.kill()
    stderr = process.stderr.read() if process.stderr else ""
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] > 0
    assert "sk-test-key" not in stderr


@pytest.mark.slow  # loads the tiny model and runs two short phases
def test_bench_serve_on_tiny_prints_every_key() -> None:
    done = collab_agent(
        "bench",
        "serve",
        "--models",
        "tiny",
        "--clients",
        "2",
        "--seconds",
        "1",
        "--budget",
        "8",
        "--max-tokens",
        "4",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    for key in (
        "clients",
        "seconds",
        "requests",
        "errors",
        "requests_per_s",
        "latency_p50_s",
        "latency_p99_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "tokens_per_s",
        "tokens_per_s_in_process",
        "http_vs_in_process",
    ):
        assert key in figures
    assert figures["errors"] == 0
    assert figures["requests"] >= 2
    assert figures["tokens_per_s"] > 0
