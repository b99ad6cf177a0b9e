"""`bench kv` on tiny random-weight models: the JSON keys DESIGN.md fixes, and sane figures."""

from __future__ import annotations

import math

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from collab_agent.bench.kv import METHOD_NAMES, run_kv_bench


def tiny(seed: int, layers: int, heads: int, hidden: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    return Qwen2ForCausalLM(config).eval()


def test_run_kv_bench_reports_every_method_and_budget():
    small, large = tiny(0, 2, 4, 64), tiny(1, 2, 8, 128)
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, 256, (2, 180), generator=g).tolist()
    with torch.inference_mode():
        result = run_kv_bench(small, large, contexts, tokens=4, budgets=[0.2, 0.1])
    assert set(result["methods"]) == set(METHOD_NAMES)
    for cells in result["methods"].values():
        assert set(cells) == {"0.2", "0.1"}
        for budget, cell in cells.items():
            assert set(cell) >= {"top1_agreement", "kl", "kv_bytes_ratio", "decode_speed_ratio"}
            assert (
                0 <= cell["top1_agreement"] <= 1 and math.isfinite(cell["kl"]) and cell["kl"] >= 0
            )
            assert cell["kv_bytes_ratio"] < float(budget) + 0.05
    assert result["full_numerics_floor"]["top1_agreement"] == 1.0


def test_a_reversible_method_cloned_after_a_shared_prefill_starts_from_every_token():
    from collab_agent.bench.kv import statistics_probe
    from collab_agent.cache import SmallKV
    from collab_agent.cache.generate import decode, prefill

    small, large = tiny(0, 2, 4, 64), tiny(1, 2, 8, 128)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        base, last, _ = prefill(large, ids, statistics_probe(small))
        full_keys = [layer.keys.clone() for layer in base.layers]
        method = SmallKV(assistant=small, budget=0.1).attach(large)
        cache = base.clone(method=method)
        method.observe_tokens(cache, ids)
        out = decode(large, cache, last, 3)
    assert torch.isfinite(out.logits).all()
    for layer, keys in zip(cache.layers, full_keys, strict=True):
        torch.testing.assert_close(layer.host_keys[..., :150, :], keys)


def test_kv_gsm8k_prompts_fit_exactly_and_never_show_the_problem_its_own_answer():
    from collab_agent.backends.tiny import qwen_tokenizer
    from collab_agent.bench.kv_gsm8k import gsm8k_prompts, worked_example
    from collab_agent.evaluation.datasets import Problem

    problems = [
        Problem(
            id=f"p{i}",
            question=f"Tom has {i} apples and buys {i + 2}. How many now?",
            answer=str(2 * i + 2),
            extra={
                "solution": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}.\n#### {2 * i + 2}"
            },
        )
        for i in range(12)
    ]
    assert worked_example(problems[3]).endswith("Answer: He has 3 + 5 = 8.\nThe answer is 8.\n\n")
    tokenizer = qwen_tokenizer()
    prompts = gsm8k_prompts(tokenizer, problems[:2], problems, 300)
    assert [len(p) for p in prompts] == [300, 300]
    for problem, ids in zip(problems[:2], prompts, strict=True):
        text = tokenizer.decode(ids)
        assert text.count(problem.question) == 1  # asked once, never among the examples
        assert text.rstrip().endswith("assistant")


def test_kv_gsm8k_at_budget_one_every_cache_answers_as_the_full_one():
    from collab_agent.backends.tiny import tiny_pair
    from collab_agent.bench.kv_gsm8k import run_kv_gsm8k
    from collab_agent.evaluation.datasets import Problem

    pair = tiny_pair()
    problems = [
        Problem(
            id=f"p{i}",
            question=f"What is {i} + {i}?",
            answer=str(2 * i),
            extra={"solution": f"{i} + {i} = {2 * i}\n#### {2 * i}"},
        )
        for i in range(10)
    ]
    with torch.inference_mode():
        result = run_kv_gsm8k(
            pair.small,
            pair.large,
            pair.tokenizer,
            problems[:2],
            problems[2:],
            1.0,
            200,
            5,
            ("smallkv", "h2o", "snapkv", "streaming"),
            batch_size=1,  # two batches of one
        )
    full = result["answers"]["full"]
    for name, cell in result["methods"].items():
        assert result["texts"][name] == result["texts"]["full"], name
        assert result["answers"][name] == full
        assert cell["same_answer_as_full"] == 2 and cell["kv_bytes_ratio"] == 1.0


def test_decode_stops_once_every_row_has_produced_a_stop_token():
    from collab_agent.cache import Full
    from collab_agent.cache.generate import decode, prefill

    large = tiny(1, 2, 8, 128)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache, last, _ = prefill(large, ids, Full())
        whole = decode(large, cache.clone(), last, 6)
        stop = {int(whole.tokens[0, 1]), int(whole.tokens[1, 3])}  # row 0 by step 1, row 1 by 3
        first = min(
            t for t in range(6) if all(bool(set(r[: t + 1].tolist()) & stop) for r in whole.tokens)
        )
        cut = decode(large, cache.clone(), last, 6, stop_ids=stop)
    assert cut.tokens.shape[1] == first + 1
    assert torch.equal(cut.tokens, whole.tokens[:, : first + 1])
    assert torch.allclose(cut.logits, whole.logits[:, : first + 1])


def test_every_method_name_builds_the_method_it_names():
    import pytest

    from collab_agent.bench.kv import VARIANTS, make_method, parse_methods
    from collab_agent.cache import METHODS, SmallKV
    from collab_agent.errors import ConfigError

    small = tiny(0, 2, 4, 64)
    names = parse_methods(",".join(METHOD_NAMES + VARIANTS))
    built = {name: make_method(name, small) for name in names}
    for name in METHOD_NAMES:
        expected = SmallKV if name == "smallkv" else METHODS[name]
        assert type(built[name]) is expected
    assert built["smallkv"] == SmallKV(assistant=small)
    assert built["smallkv_paper"] == SmallKV(assistant=small, **SmallKV.PAPER)
    assert built["smallkv_no_prior"].prior == 0.0
    assert built["smallkv_marginal"].split == (2, 0, 2)
    assert built["smallkv_marginal"].prior == SmallKV(assistant=small).prior
    with pytest.raises(ConfigError, match=r"--methods.*smallkv_typo"):
        parse_methods("smallkv,smallkv_typo")


def test_bench_kv_collab_runs_trigreason_with_every_cache_on_tiny_models(tmp_path) -> None:
    """`bench kv-collab --models tiny --json`: the fixed keys for every method, no errors; with
    ``--out`` a second run skips the problems the first finished and reports the same figures,
    and a run under other settings is refused."""
    import json

    import typer
    from typer.testing import CliRunner

    from collab_agent.bench.kv_collab import register

    bench = typer.Typer()
    register(bench)
    bench.command("noop")(lambda: None)  # keep "kv-collab" a subcommand
    args = ["kv-collab", "--models", "tiny", "--problems", "1", "--json"]
    args += ["--reasoning-tokens", "32", "--step-tokens", "12"]
    args += ["--methods", "smallkv,h2o,smallkv_every_8"]
    args += ["--out", str(tmp_path)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    again = CliRunner().invoke(bench, args)
    assert again.exit_code == 0, again.output
    assert "1 problems already in" in again.output
    assert json.loads(again.stdout.strip().splitlines()[-1]) == out
    other = CliRunner().invoke(bench, [*args, "--budget", "0.5"])
    assert other.exit_code != 0 and "--out" in str(other.exception)
    assert out["problems"] == 1
    assert set(out["methods"]) == {"full", "smallkv", "h2o", "smallkv_every_8"}
    keys = {
        "accuracy",
        "same_answer_as_full",
        "kv_bytes_vs_full",
        "decode_s_per_token_vs_full",
        "srm_forward_tokens_vs_plain",
        "srm_tokens_per_trace_token_vs_plain",
        "rollbacks",
        "errors",
    }
    for cell in out["methods"].values():
        assert keys <= set(cell) and cell["errors"] == 0
    # SmallKV reads the SRM backend's own pass: no second SRM pass over the LRM's tokens
    assert out["methods"]["full"]["srm_tokens_per_trace_token_vs_plain"] == 1.0
    assert out["methods"]["smallkv"]["srm_tokens_per_trace_token_vs_plain"] < 1.1
