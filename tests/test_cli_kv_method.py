"""``--kv-method``: the large model's KV cache compressed from the command line, in the
collaboration the user runs (``run``, ``eval``), on the tiny pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import collab_agent

from collab_agent.errors import ConfigError


def test_load_pair_compresses_the_large_models_cache_guided_by_the_small_backend() -> None:
    import anyio

    from collab_agent.cache import SmallKV
    from collab_agent.cache.compressed import CompressedCache
    from collab_agent.cli.backends import load_pair
    from collab_agent.core.reasoner import Reasoner
    from collab_agent.policies import TrigReason

    small, large = load_pair("tiny", None, None, kv_method="smallkv:0.3")
    method = large.kv_method
    assert isinstance(method, SmallKV) and method.budget == 0.3
    assert method.assistant is small  # one SRM pass: SmallKV reads the small backend's own
    held: list[float] = []  # device bytes over full bytes after each large-model call

    def observe(request: object, prompt: list[int], sampled: list[int]) -> None:
        kv = large._store._entries["kv"].kv
        assert isinstance(kv, CompressedCache)
        held.append(kv.device_bytes() / kv.full_bytes())

    large.on_generation = observe
    reasoner = Reasoner(small, large, TrigReason(priming_steps=1), budget=96, step_max_tokens=24)
    question = "Count the apples: " + "one apple, " * 60 + "how many?"

    async def solve() -> None:
        await reasoner.run([{"role": "user", "content": question}], conversation_id="kv")

    anyio.run(solve)
    # the prompt alone is over 100 tokens: every call leaves about 0.3 of the whole context
    assert held and max(held) < 0.5


def test_load_pair_default_budget_is_the_methods_own() -> None:
    from collab_agent.cache import H2O
    from collab_agent.cli.backends import load_pair

    _, large = load_pair("tiny", None, None, kv_method="h2o")
    assert isinstance(large.kv_method, H2O) and large.kv_method.budget == H2O().budget


@pytest.mark.parametrize(
    "kv_method, small, large, fragment",
    [
        ("lzma", None, None, "unknown 'lzma'"),
        ("smallkv:1.5", None, None, "(0, 1]"),
        ("h2o:a", None, None, "not a number"),
        ("h2o", None, "llamacpp:bundled:qwen2.5-coder-1.5b-instruct", "large model that runs"),
        ("smallkv", "llamacpp:bundled:qwen2.5-coder-0.5b-instruct", "tiny", "small model that"),
    ],
)
def test_a_bad_kv_method_is_refused_before_any_model_loads(
    kv_method: str,
    small: str | None,
    large: str | None,
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from collab_agent.backends import specs
    from collab_agent.cli.backends import load_pair

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before --kv-method was checked")

    monkeypatch.setattr(specs, "load_backend", no_load)
    with pytest.raises(ConfigError, match="--kv-method") as caught:
        load_pair("tiny", small, large, kv_method=kv_method)
    assert fragment in str(caught.value)


def test_run_with_kv_method_answers_and_a_bad_one_exits_2() -> None:
    done = collab_agent(
        "run", "What is 2 + 2?", "--models", "tiny", "--budget", "24", "--json",
        "--kv-method", "snapkv:0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["large"]["calls"] >= 1
    bad = collab_agent("run", "q", "--models", "tiny", "--kv-method", "zip")
    assert bad.returncode == 2
    assert "--kv-method" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_records_the_kv_method_and_will_not_resume_under_another(tmp_path: Path) -> None:
    data = tmp_path / "two.jsonl"
    rows = [
        {"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in (1, 2)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    common = ["eval", "--models", "tiny", "--data", str(data), "--policy", "trigreason"]
    common += ["--max-steps", "2", "--step-max-tokens", "6", "--answer-max-tokens", "4"]
    first = collab_agent(*common, "--out", str(out), "--kv-method", "h2o:0.5")
    assert first.returncode == 0, first.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["large_kv_method"] == "H2O(budget=0.5)"
    other = collab_agent(*common, "--out", str(out), "--kv-method", "smallkv:0.5")
    assert other.returncode == 2
    assert "large_kv_method" in other.stderr
