"""The collab-agent command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def collab_agent(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "collab_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_run_on_tiny_models_prints_the_trace_as_json() -> None:
    done = collab_agent("run", "What is 2 + 2?", "--models", "tiny", "--budget", "16", "--json")
    assert done.returncode == 0, done.stderr
    trace = json.loads(done.stdout)
    assert trace["policy"] == "trigreason"
    assert trace["steps"] and trace["steps"][0]["author"] == "large"
    assert trace["steps"][0]["trigger"] == "strategic_priming"
    assert trace["usage"]["large"]["calls"] >= 1


def test_runs_reasoning_options_reach_the_reasoner() -> None:
    done = collab_agent(
        "run", "What is 2 + 2?", "--models", "tiny", "--budget", "32", "--json",
        "--max-steps", "2", "--step-max-tokens", "4", "--answer-max-tokens", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    trace = json.loads(done.stdout)
    assert len(trace["steps"]) == 2 and trace["stop_reason"] == "max_steps"
    assert all(step["tokens"] <= 4 for step in trace["steps"])


def test_models_lists_the_three_bundled_models() -> None:
    done = collab_agent("models", "--json")
    assert done.returncode == 0, done.stderr
    names = {row["name"] for row in json.loads(done.stdout)}
    assert names == {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
    }


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "q", "--small", "nonsense"], "model spec"),
        (["run", "q", "--models", "huge"], "--models"),
        (["run", "q", "--models", "tiny", "--policy", "no-such-policy"], "policy"),
        (["run", "q", "--models", "tiny", "--budget", "0"], "budget"),
        (["run", "q", "--models", "tiny", "--max-steps", "0"], "max_steps"),
        (["run", "q", "--models", "tiny", "--top-p", "0", "--temperature", "0.5"], "top_p"),
    ],
)
def test_bad_arguments_give_one_clear_line_and_exit_code_2(args: list[str], fragment: str) -> None:
    done = collab_agent(*args)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_every_benchmark_is_registered() -> None:
    done = collab_agent("bench", "--help")
    assert done.returncode == 0
    for name in ("prefix-reuse", "edge-cloud", "kv", "kv-gsm8k", "batch"):
        assert name in done.stdout


def test_load_backend_threads_sets_torchs_threads_and_is_checked() -> None:
    import torch

    from collab_agent.backends.specs import load_backend
    from collab_agent.errors import ConfigError

    before = torch.get_num_threads()
    try:
        load_backend("tiny:0", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        load_backend("tiny:0", threads=0)
