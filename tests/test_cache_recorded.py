"""The compressed caches against a recorded run: work skipped to make a decode step cheaper must
not change what a user gets, the tokens generated and the positions each layer keeps.

The recording (``data/kv_recorded_runs.json``) was made with the code before the decode-step
work was trimmed; ``python tests/test_cache_recorded.py`` writes it anew (only on purpose: a
change of method that is meant to change the choice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cache_smallkv import VOCAB, tiny

from collab_agent.cache import H2O, CompressedCache, KVMethod, SmallKV
from collab_agent.cache.attention import attention_probs, use_kv_attention
from collab_agent.cache.generate import prefill
from collab_agent.cache.observer import ObservedCache

RECORDED = Path(__file__).parent / "data" / "kv_recorded_runs.json"
STEPS = 10

ARMS = ("smallkv", "smallkv_paper", "smallkv_every_4", "smallkv_two_rows", "h2o")
"""SmallKV as shipped (no marginal share), the paper's layout (marginal tokens, whole-context
budget), block refresh, a batch of two rows with their own budgets, and H2O (the slot code it
shares with SmallKV)."""


def method(arm: str, small: torch.nn.Module) -> KVMethod:
    if arm == "smallkv":
        return SmallKV(assistant=small, budget=0.2)
    if arm == "smallkv_paper":
        return SmallKV(assistant=small, budget=0.2, **SmallKV.PAPER)
    if arm == "smallkv_every_4":
        return SmallKV(assistant=small, budget=0.2, refresh_every=4)
    if arm == "smallkv_two_rows":
        return SmallKV(assistant=small, budget=0.2, split=(2, 1, 2))
    return H2O(budget=0.2, budget_of="context")


def held(cache: CompressedCache) -> list[Any]:
    """Per layer, per row and KV head: the sorted positions of the K+V slots, and of the
    marginal (V only) slots."""
    out = []
    for layer in cache.layers:
        assert layer.positions is not None
        mpos = layer.marginal_positions
        rows = []
        for b in range(layer.positions.shape[0]):
            heads = []
            for h in range(layer.positions.shape[1]):
                kept = layer.positions[b, h]
                marg = [] if mpos is None else sorted(mpos[b, h][mpos[b, h] >= 0].tolist())
                heads.append([sorted(kept[kept >= 0].tolist()), marg])
            rows.append(heads)
        out.append(rows)
    return out


@torch.no_grad()
def record(arm: str, large: torch.nn.Module, small: torch.nn.Module) -> dict[str, Any]:
    """Greedy decoding of STEPS tokens after a 200-token prompt: the tokens, and the positions
    held after every step."""
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, VOCAB, (1, 200), generator=gen)
    m = method(arm, small)
    budgets = None
    if arm == "smallkv_two_rows":
        prompt = torch.cat([prompt, torch.randint(0, VOCAB, (1, 200), generator=gen)])
        budgets = [0.2, 0.35]
    cache = m.new_cache(budgets)
    cache, logits, _ = prefill(large, prompt, m, cache)
    tokens, steps = [], []
    for _ in range(STEPS):
        tok = logits.argmax(-1)
        tokens.append(tok.tolist())
        out = large(input_ids=tok[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        steps.append(held(cache))
    getattr(m, "detach", lambda: None)()
    return {"tokens": tokens, "held": steps}


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(large, small), the SmallKV tests' pair."""
    return tiny(1, 3, 8, 128), tiny(0, 2, 4, 64)


@pytest.mark.parametrize("arm", ARMS)
def test_decode_keeps_the_recorded_tokens_and_positions(pair, arm):
    expected = json.loads(RECORDED.read_text())[arm]
    got = record(arm, *pair)
    assert got["tokens"] == expected["tokens"]
    for step, (g, e) in enumerate(zip(got["held"], expected["held"], strict=True)):
        assert g == e, f"step {step}: held positions differ from the recording"


if __name__ == "__main__":
    models = (tiny(1, 3, 8, 128), tiny(0, 2, 4, 64))
    RECORDED.parent.mkdir(exist_ok=True)
    RECORDED.write_text(json.dumps({arm: record(arm, *models) for arm in ARMS}) + "\n")
    print(f"wrote {RECORDED}")


def test_one_query_attention_masks_only_empty_slots():
    """A decode step's query follows every key it sees: without the causal mask (and without
    any mask when no slot is empty) the probabilities are the masked ones, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(1, 8, 1, 16, generator=gen)
    keys = torch.randn(1, 2, 40, 16, generator=gen)
    q_pos = torch.tensor([57])
    k_pos = torch.randperm(57, generator=gen)[:40].expand(1, 2, 40).clone()
    k_pos[0, 0, ::3] = -1  # empty slots
    causal = attention_probs(query, keys, q_pos, k_pos, 0.25)
    assert torch.equal(attention_probs(query, keys, q_pos, k_pos, 0.25, causal=False), causal)
    assert causal[0, 0, :, :, ::3].eq(0).all()
    full = torch.arange(40).expand(1, 2, 40)
    assert torch.equal(
        attention_probs(query, keys, torch.tensor([40]), None, 0.25, causal=False),
        attention_probs(query, keys, torch.tensor([40]), full, 0.25),
    )


@torch.no_grad()
def test_srm_decode_steps_record_the_same_statistics_after_calibration(pair):
    """Once calibration is over the SRM's one-token steps take a shorter path; its statistics
    (accumulated attention, the window and its sum, the last row) equal those of the full path
    (a cache still calibrating) through a window wrap-around."""
    _, small = pair
    use_kv_attention(small)  # the attention that lets the cache layers record
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(8))
    caches = [ObservedCache(128, keep_last=True, window=32) for _ in range(2)]
    for cache in caches:
        small.model(input_ids=ids[:, :110], cache=cache, use_cache=True)
    for layer in caches[1].layers:
        layer.calibrating = False
    for t in range(110, 150):
        for cache in caches:
            small.model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
    for slow, fast in zip(caches[0].layers, caches[1].layers, strict=True):
        for name in ("accumulated", "window_sum", "ring", "last"):
            assert torch.equal(getattr(slow, name), getattr(fast, name)), name
        assert fast.seen == slow.seen == 150
