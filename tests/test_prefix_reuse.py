"""`bench prefix-reuse` on the tiny pair: each model runs forward on what it needs, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair
from collab_agent.bench.prefix_reuse import distinct_prefixes, load_problems, measure
from collab_agent.errors import ConfigError

PROBLEMS = [
    {"id": "t-1", "question": "Tom has 3 apples and buys 4 more. How many?", "answer": "7"},
    {"id": "t-2", "question": "A box holds 6 eggs. How many eggs in 5 boxes?", "answer": "30"},
]


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    monkeypatch.setenv("COLLAB_AGENT_DATA", str(tmp_path))
    return tmp_path


def test_distinct_prefixes_counts_each_token_prefix_once():
    assert distinct_prefixes([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [7]]) == 6
    assert distinct_prefixes([]) == 0


def test_problems_come_from_the_data_folder(data: Path):
    assert [p["id"] for p in load_problems(1)] == ["t-1"]
    assert len(load_problems(10)) == 2


def test_missing_data_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLLAB_AGENT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as err:
        load_problems(1)
    assert err.value.argument == "COLLAB_AGENT_DATA"


async def test_each_model_processes_about_what_it_needs(tiny_pair: TinyPair):
    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    figures = await measure(
        small, large, PROBLEMS[:1], priming=1, budget=48, log=lambda _message: None
    )
    for role in ("small", "large"):
        row = figures[role]
        assert set(row) >= {
            "processed_tokens",
            "needed_tokens",
            "ratio",
            "tokens_per_s_vs_generate",
        }
        assert row["calls"] >= 1 and row["needed_tokens"] > 0
        assert row["ratio"] <= 1.05, role
        assert row["tokens_per_s_vs_generate"] > 0
    # the hooks and observers are gone afterwards
    assert small.on_generation is None and not small.model._forward_pre_hooks


def test_the_command_prints_the_fixed_json_keys(data: Path):
    import typer
    from typer.testing import CliRunner

    from collab_agent.bench.prefix_reuse import register

    bench = typer.Typer()
    bench.callback()(lambda: None)  # a group, as under `collab-agent bench`
    register(bench)
    result = CliRunner().invoke(
        bench, ["prefix-reuse", "--models", "tiny", "--problems", "1", "--budget", "24", "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for role in ("small", "large"):
        assert {"processed_tokens", "needed_tokens", "ratio", "tokens_per_s_vs_generate"} <= set(
            figures[role]
        )
