"""What a new user runs first: every Python snippet of the README and every file in examples/,
on the tiny random-weight pair, bounded.

README snippets run as written except for one documented substitution: each bundled model spec
becomes its tiny counterpart (the 0.5B -> ``tiny:0``, the 1.5B -> ``tiny:1``) and every
``budget=`` / ``max_tokens=`` number becomes a few tokens, so a snippet runs in seconds. A
snippet that calls ``collab-agent serve`` at ``127.0.0.1:8000`` calls a real server of the
README's policies on the tiny pair (a few reasoning tokens a request) at a free port instead.
Examples take ``--models tiny`` and their own ``--budget`` / ``--max-tokens``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
SPECS = {
    r'"(?:llamacpp:)?bundled:qwen2\.5-coder-0\.5b-instruct"': '"tiny:0"',
    r'"(?:llamacpp:)?bundled:qwen2\.5-coder-1\.5b-instruct"': '"tiny:1"',
    r"\b((?:reasoning_|answer_max_)?budget|max_tokens|answer_max_tokens)=\d+": r"\1=6",
}


def readme_snippets() -> list[str]:
    return SNIPPET.findall((ROOT / "README.md").read_text())


def on_tiny_models(code: str) -> str:
    for pattern, replacement in SPECS.items():
        code = re.sub(pattern, replacement, code)
    return code


def test_the_substitution_leaves_no_bundled_model_in_any_snippet() -> None:
    snippets = readme_snippets()
    assert len(snippets) >= 3
    assert not [code for code in map(on_tiny_models, snippets) if "bundled:" in code]


SERVED = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """``collab-agent serve --models tiny --policy trigreason --policy large-only`` in-process."""
    from serve_harness import running

    from collab_agent import LargeOnly, TrigReason, load_backend
    from collab_agent.serve import ServeConfig, create_app

    config = ServeConfig(
        policies={"trigreason": TrigReason(), "large-only": LargeOnly()}, reasoning_budget=6
    )
    with running(create_app(config, load_backend("tiny:0"), load_backend("tiny:1"))) as server:
        yield server.root


@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_readme_python_snippet_runs_as_written_on_the_tiny_pair(
    index: int, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    code = on_tiny_models(readme_snippets()[index])
    if SERVED in code:
        code = code.replace(SERVED, request.getfixturevalue("served"))
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if '"answer:"' in code:
        assert "answer:" in out
    elif "print(" in code:
        assert out.strip()  # the served reasoning and answer, streamed


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_runs_on_the_tiny_pair(example: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            *(sys.executable, str(ROOT / "examples" / example)),
            *("--models", "tiny", "--budget", "6", "--max-tokens", "6"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
