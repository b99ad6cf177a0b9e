"""`KVMethod.refresh_every`: choosing the kept tokens every N decode steps instead of every step."""

from __future__ import annotations

import pytest
import torch
from test_cache_smallkv import VOCAB, tiny
from transformers import Qwen2ForCausalLM

from collab_agent.cache import H2O, CacheConfigError, CompressedCache, SmallKV
from collab_agent.cache.generate import prefill

STEPS = 12
EVERY = 4


@pytest.fixture(scope="module")
def pair() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """(large, small), shaped like the SmallKV tests' pair."""
    return tiny(1, 3, 8, 128), tiny(0, 2, 4, 64)


@pytest.fixture(scope="module")
def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """A 200-token prompt and the STEPS tokens teacher-forced after it."""
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (1, 200), generator=gen), torch.randint(
        0, VOCAB, (1, STEPS), generator=gen
    )


Held = list[list[set[int]]]


def held(cache: CompressedCache) -> Held:
    """The token positions each layer's slots hold, per KV head."""
    out = []
    for layer in cache.layers:
        assert layer.positions is not None
        out.append([set(p[p >= 0].tolist()) for p in layer.positions[0]])
    return out


@torch.no_grad()
def run(model, method, tokens) -> tuple[list[Held], CompressedCache]:
    """Prefill, then feed the forced tokens one by one; the held positions after each step."""
    prompt, forced = tokens
    cache, _, _ = prefill(model, prompt, method)
    steps = []
    for t in range(STEPS):
        model(input_ids=forced[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(held(cache))
    getattr(method, "detach", lambda: None)()
    return steps, cache


def test_refresh_every_must_be_a_positive_integer(pair):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CacheConfigError, match="refresh_every"):
            H2O(refresh_every=bad)
    with pytest.raises(CacheConfigError, match="refresh_every"):
        SmallKV(assistant=pair[1], refresh_every=0)


def test_smallkv_in_blocks_keeps_the_every_step_slots_at_each_refresh(pair, tokens):
    """SmallKV's choice depends on the SRM's scores only (eviction is reversible), so at each
    refresh the block path holds exactly the tokens the every-step path holds at that step, and
    in between it holds that choice plus the tokens appended since; the slots' K/V are the
    tokens' own (their host copies)."""
    large, small = pair
    every_step, _ = run(large, SmallKV(assistant=small, budget=0.2), tokens)
    blocks, cache = run(large, SmallKV(assistant=small, budget=0.2, refresh_every=EVERY), tokens)
    refreshes = 0
    # step 0 compresses (a first selection); then a refresh every EVERY steps
    for t in range(STEPS):
        if t % EVERY == 0:
            assert blocks[t] == every_step[t], f"step {t}"
            chosen, since = every_step[t], t
            refreshes += 1
        else:
            length = tokens[0].shape[1] + t + 1
            appended = set(range(length - (t - since), length))
            assert blocks[t] == [[h | appended for h in layer] for layer in chosen], f"step {t}"
    assert refreshes == STEPS // EVERY
    for layer in cache.layers:
        assert layer.positions is not None and layer.host_keys is not None
        for h in range(2):
            pos = layer.positions[0, h]
            ok = pos >= 0
            torch.testing.assert_close(layer.keys[0, h][ok], layer.host_keys[0, h][pos[ok]])
            assert layer.host_values is not None
            torch.testing.assert_close(layer.values[0, h][ok], layer.host_values[0, h][pos[ok]])


def test_h2o_in_blocks_is_over_budget_by_less_than_a_block(pair, tokens):
    """Between refreshes H2O only appends; each refresh evicts back to the every-step size,
    only among the tokens it held (an evicted token stays out), never the newest ones. The
    budget is of the context, so the allowance grows slower than the appended tokens."""
    large, _ = pair
    every_step, _ = run(large, H2O(budget=0.2, budget_of="context"), tokens)
    blocks, cache = run(large, H2O(budget=0.2, budget_of="context", refresh_every=EVERY), tokens)
    prev = None
    most = 0
    for t in range(STEPS):
        for layer_every, layer_block in zip(every_step[t], blocks[t], strict=True):
            for h_every, h_block in zip(layer_every, layer_block, strict=True):
                extra = len(h_block) - len(h_every)
                if t % EVERY == 0:
                    assert extra == 0, f"step {t}"
                else:
                    assert 0 <= extra < EVERY, f"step {t}"
                most = max(most, extra)
        if prev is not None:
            length = tokens[0].shape[1] + t + 1
            for layer_prev, layer_now in zip(prev, blocks[t], strict=True):
                for h_prev, h_now in zip(layer_prev, layer_now, strict=True):
                    assert h_now <= h_prev | {length - 1}
                    assert length - 1 in h_now
        prev = blocks[t]
    assert most > 0  # between refreshes the cache did go over the every-step size
    # the slot store does not grow with the decoded tokens: freed slots are reused
    store = cache.layers[0].keys.shape[-2]
    assert store <= max(len(h) for h in blocks[-1][0]) + EVERY


def srm_calls(small: Qwen2ForCausalLM) -> list[int]:
    """Tokens of each forward call of ``small``'s base model, recorded from now on."""
    calls: list[int] = []
    small.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[-1]), with_kwargs=True
    )
    return calls


def test_smallkv_in_blocks_runs_the_srm_once_a_block_over_the_blocks_tokens(tokens):
    """Between refreshes the SRM does not run; at a refresh it reads every token since the last
    in one call, so it reads each token once, as the every-step path does."""
    large, small = tiny(1, 3, 8, 128), tiny(0, 2, 4, 64)
    calls = srm_calls(small)
    _, cache = run(large, SmallKV(assistant=small, budget=0.2, refresh_every=EVERY), tokens)
    # the prefill, the first compression's step, then one call of EVERY tokens a refresh; the
    # tokens since the last refresh wait until the next selection
    assert calls == [tokens[0].shape[1], 1] + [EVERY] * (STEPS // EVERY - 1)
    unread = (STEPS - 1) % EVERY
    assert cache.state.pending is not None and cache.state.pending.shape[-1] == unread
    cache.compact()  # a selection outside a call: the SRM reads them first
    assert calls[-1] == unread and cache.state.pending is None


def test_smallkv_in_blocks_crop_inside_a_block_keeps_both_sides_aligned(pair, tokens):
    """A rollback to a point inside a block drops the SRM's unread tokens past it, and one
    before the SRM's last read crops the SRM; either way the next selection reads the SRM's
    statistics of exactly the large model's tokens (a mismatch raises)."""
    large, small = pair
    prompt, forced = tokens
    n = prompt.shape[1]
    method = SmallKV(assistant=small, budget=0.2, refresh_every=EVERY)
    cache, _, _ = prefill(large, prompt, method)
    with torch.no_grad():
        for t in range(7):  # a refresh at step 4, then steps 5 and 6 pending
            large(input_ids=forced[:, t : t + 1], cache=cache, use_cache=True)
        assert cache.state.pending.shape[-1] == 2
        cache.crop(n + 6)  # inside the block: one pending token stays
        assert cache.state.pending.shape[-1] == 1 and cache.state.srm.get_seq_length() == n + 5
        cache.crop(n + 3)  # before the SRM's last read: the SRM is cut, nothing pending
        assert cache.state.pending is None and cache.state.srm.get_seq_length() == n + 3
        for t in range(3, 3 + EVERY):  # the first call after a crop chooses again
            large(input_ids=forced[:, t : t + 1], cache=cache, use_cache=True)
    method.detach()
    assert cache.state.srm.get_seq_length() + cache.state.pending.shape[-1] == n + 3 + EVERY
    for layer in cache.layers:
        assert layer.length == n + 3 + EVERY
        assert int(layer.positions.max()) < layer.length
