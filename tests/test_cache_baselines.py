"""The KV baselines: what each keeps, at the same budget accounting as SmallKV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from collab_agent.cache import (
    H2O,
    CacheConfigError,
    CompressedCache,
    ExpectedAttention,
    Full,
    SnapKV,
    StreamingLLM,
    generate,
)
from collab_agent.cache.base import KVLayer
from collab_agent.cache.expected import expected_attention, observe_queries
from collab_agent.cache.generate import decode, prefill

VOCAB = 512
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def large() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 160), generator=torch.Generator().manual_seed(4))


def kept(method, large, prompt, steps=3):
    cache, last, _ = prefill(large, prompt, method)
    out = decode(large, cache, last, steps)
    return out, [
        set(layer.positions[0, h][layer.positions[0, h] >= 0].tolist())
        for layer in cache.layers
        for h in range(2)
    ]


@pytest.mark.parametrize(
    "method",
    [H2O(budget=1.0), SnapKV(budget=1.0), StreamingLLM(budget=1.0), ExpectedAttention(budget=1.0)],
)
def test_budget_one_is_the_full_cache(large, prompt, method):
    ref = generate(large, prompt, Full(), max_new_tokens=6)
    out = generate(large, prompt, method, max_new_tokens=6)
    assert torch.equal(out.logits, ref.logits)


def test_streaming_keeps_sinks_and_the_most_recent_tokens(large, prompt):
    _out, sets = kept(StreamingLLM(budget=0.25, sinks=4), large, prompt)
    n = prompt.shape[1] + 2
    allowance = 40 + 2
    for s in sets:
        assert s == set(range(4)) | set(range(n - (allowance - 4), n))


def test_snapkv_keeps_its_observation_window(large, prompt):
    _out, sets = kept(SnapKV(budget=0.25, window=32), large, prompt)
    for s in sets:
        assert set(range(prompt.shape[1] - 32, prompt.shape[1] + 2)) <= s
        assert len(s) == 40 + 2


def test_h2o_keeps_heavy_hitters_and_recent_tokens(large, prompt):
    out, sets = kept(H2O(budget=0.25), large, prompt)
    for layer in out.cache.layers:
        scores = layer.state.accumulated  # accumulated attention of the model itself
        assert scores is not None and scores.shape[-1] == prompt.shape[1] + 2
    for s in sets:
        assert len(s) == 40 + 2
        assert set(range(prompt.shape[1] + 2 - 21, prompt.shape[1] + 2)) <= s


@pytest.mark.parametrize("method", [H2O, SnapKV, StreamingLLM, ExpectedAttention])
def test_equal_budget_accounting(large, prompt, method):
    out, _ = kept(method(budget=0.1), large, prompt, steps=4)
    n = prompt.shape[1] + 3
    assert out.cache.kv_bytes_ratio() == pytest.approx((16 + 3) / n, abs=1e-6)


def rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Plain RoPE of ``x`` (..., D) at one position, transformers' half-split pairing."""
    d = x.shape[-1]
    angle = position / theta ** (torch.arange(0, d, 2).double() / d)
    cos, sin = angle.cos().repeat(2), angle.sin().repeat(2)
    x1, x2 = x.double().chunk(2, -1)
    return (x.double() * cos + torch.cat([-x2, x1], -1) * sin).float()


def observed(queries: torch.Tensor, positions: list[int], theta: float = 10000.0) -> KVLayer:
    """A layer that has seen ``queries`` (B, H, q, D, before RoPE) at ``positions``."""
    layer = KVLayer(CompressedCache(ExpectedAttention()), 0)
    post = torch.stack([rope(queries[:, :, i], p, theta) for i, p in enumerate(positions)], 2)
    config = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": theta})
    module = torch.nn.Module()
    module.config = config
    observe_queries(layer, module, post, torch.tensor(positions), sinks=0)
    return layer


def test_expected_attention_of_one_query_is_its_attention():
    # one observed query, one future position equal to its own: no covariance, no averaging,
    # so the expectation is that query's attention (mean over each KV head's query heads)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 10, 16, generator=g)
    layer = observed(q, [7])
    got = expected_attention(layer, k, start=7, future=1)
    q_post = rope(q[:, :, 0], 7, 10000.0).reshape(1, 2, 2, 16)
    want = torch.softmax(torch.einsum("bkgd,bksd->bkgs", q_post, k) / 4, -1).mean(2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_expected_attention_is_the_gaussian_expectation_over_queries():
    # many queries at position 0 (no rotation): exp(mu.k/sqrt(d) + k'Sigma k/(2d)) is the mean
    # of exp(q.k/sqrt(d)) over the queries when they are Gaussian
    g = torch.Generator().manual_seed(1)
    q = 0.3 * torch.randn(1, 2, 20000, 8, generator=g) + 0.5
    k = torch.randn(1, 2, 6, 8, generator=g)
    layer = observed(q, [0] * q.shape[2])
    got = expected_attention(layer, k, start=0, future=1)
    mgf = torch.exp(torch.einsum("bhqd,bhsd->bhqs", q.double(), k.double()) / 8**0.5).mean(2)
    want = (mgf / mgf.sum(-1, keepdim=True)).float()
    torch.testing.assert_close(got, want, rtol=0.02, atol=1e-3)


def test_expected_attention_keeps_its_sinks_and_decoded_tokens(large, prompt):
    _out, sets = kept(ExpectedAttention(budget=0.25, sinks=4), large, prompt)
    for s in sets:
        assert set(range(4)) | set(range(prompt.shape[1], prompt.shape[1] + 2)) <= s
        assert len(s) == 40 + 2


def test_budget_out_of_range_names_the_argument():
    with pytest.raises(CacheConfigError, match="budget"):
        H2O(budget=1.5)
    with pytest.raises(CacheConfigError, match="window"):
        SnapKV(window=0)
    with pytest.raises(CacheConfigError, match="sinks"):
        StreamingLLM(sinks=-1)
    with pytest.raises(CacheConfigError, match="future"):
        ExpectedAttention(future=0)


def test_gpu_throughput_script_runs_at_tiny_shape_on_cpu():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "collab_agent.bench.gpu_smallkv_throughput",
            "--tiny",
            "--prompt",
            "130",
            "--decode",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["methods"]) == {"full_sdpa", "h2o", "smallkv"}
    for name in ("h2o", "smallkv"):
        assert result["methods"][name]["kv_bytes_ratio"] < 0.35
        assert result["methods"][name]["decode_tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_throughput_script_fails_fast_without_cuda():
    proc = subprocess.run(
        [sys.executable, "-m", "collab_agent.bench.gpu_smallkv_throughput"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--tiny" in proc.stderr
