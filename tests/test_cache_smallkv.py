"""SmallKV on tiny random-weight Qwen2 models: the claims of the paper, one test each."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from collab_agent.cache import (
    CacheConfigError,
    ExpectedAttention,
    Full,
    SmallKV,
    generate,
    teacher_force,
)
from collab_agent.cache.base import KVLayer
from collab_agent.cache.generate import check_same_tokenizer, decode, prefill
from collab_agent.cache.smallkv import marginal_output

VOCAB = 512


def tiny(seed: int, layers: int, heads: int, hidden: int, vocab: int = VOCAB) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """(large, small): 3 layers x 8 heads vs 2 layers x 4 heads, both 2 KV heads (GQA)."""
    return tiny(1, 3, 8, 128), tiny(0, 2, 4, 64)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))


def full_keys(model: Qwen2ForCausalLM, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache


PAPER = SmallKV.PAPER
"""The paper's layout: critical : recent : marginal = 2 : 1 : 2 over every token, SRM scores only."""


def run(large, small, ids, budget, steps=4, **kw):
    method = SmallKV(assistant=small, budget=budget, **kw)
    cache, last, _ = prefill(large, ids, method)
    return method, decode(large, cache, last, steps)


def test_budget_one_equals_full_cache_exactly(pair, prompt):
    large, small = pair
    ref = generate(large, prompt, Full(), max_new_tokens=6)
    out = generate(large, prompt, SmallKV(assistant=small, budget=1.0), max_new_tokens=6)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.logits, ref.logits)
    assert out.kv_bytes_ratio == 1.0


def test_model_generate_accepts_the_smallkv_cache(pair, prompt):
    large, small = pair
    method = SmallKV(assistant=small, budget=1.0).attach(large)
    plain = large.generate(prompt, max_new_tokens=5, do_sample=False)
    with_cache = large.generate(prompt, max_new_tokens=5, do_sample=False, cache=method.new_cache())
    assert torch.equal(plain, with_cache)
    compressed = large.generate(
        prompt,
        max_new_tokens=5,
        do_sample=False,
        cache=SmallKV(assistant=small, budget=0.2).attach(large).new_cache(),
    )
    assert compressed.shape == plain.shape


def test_shapes_and_positions_after_eviction(pair, prompt):
    large, small = pair
    _method, out = run(large, small, prompt, budget=0.2, steps=5, **PAPER)
    cache = out.cache
    n = prompt.shape[1] + 4  # tokens the cache has seen
    ref = full_keys(large, torch.cat([prompt, out.tokens[:, :4]], 1))
    allowance = math.ceil(0.2 * n)  # the paper's budget: a share of the whole context
    keep, recent, marginal = (allowance * 3) // 5, allowance // 5, (2 * allowance * 2) // 5
    assert cache.get_seq_length() == n
    for layer in cache.layers:
        assert isinstance(layer, KVLayer) and layer.compressed
        pos, mpos = layer.positions, layer.marginal_positions
        assert layer.keys.shape[:2] == (1, 2) and layer.keys.shape[-1] == 16
        for h in range(2):
            kept = pos[0, h][pos[0, h] >= 0]
            marg = mpos[0, h][mpos[0, h] >= 0]
            assert len(kept) == keep and len(set(kept.tolist())) == keep
            assert len(marg) == marginal
            assert not set(kept.tolist()) & set(marg.tolist())
            assert set(range(n - recent, n)) <= set(kept.tolist())
            # every kept key is the full model's key at its original position (RoPE intact);
            # decoded tokens see a compressed past, so above layer 0 only prompt tokens compare
            limit = n if layer.layer_idx == 0 else prompt.shape[1]
            slots = ((pos[0, h] >= 0) & (pos[0, h] < limit)).nonzero().flatten()
            ref_k = ref.layers[layer.layer_idx].keys[0, h, pos[0, h, slots]]
            torch.testing.assert_close(layer.keys[0, h, slots], ref_k, rtol=0, atol=1e-5)
            mslots = ((mpos[0, h] >= 0) & (mpos[0, h] < limit)).nonzero().flatten()
            ref_v = ref.layers[layer.layer_idx].values[0, h, mpos[0, h, mslots]]
            torch.testing.assert_close(
                layer.marginal_values[0, h, mslots], ref_v, rtol=0, atol=1e-5
            )
    assert out.kv_bytes_ratio < 0.5
    assert cache.kv_bytes_ratio() == pytest.approx((keep + marginal / 2) / n, abs=0.02)


def test_evicted_token_comes_back_when_the_srm_attends_to_it(pair, prompt):
    large, small = pair
    _method, out = run(large, small, prompt, budget=0.2, steps=2, **PAPER)
    cache = out.cache
    layer0 = cache.layers[0]
    held = set(layer0.positions[0, 0].tolist()) | set(layer0.marginal_positions[0, 0].tolist())
    token = next(t for t in range(5, prompt.shape[1]) if t not in held)
    for srm_layer in cache.state.srm.layers:  # the SRM now says: token matters a lot
        srm_layer.accumulated[..., token] += 1e6  # (score="accumulated")
        srm_layer.ring[..., token] += 1e6  # (score="window", the default; the sum follows)
        srm_layer.window_sum[..., token] += 32e6
    with torch.no_grad():
        large(input_ids=out.tokens[:, -1:], cache=cache, use_cache=True)
    seen = torch.cat([prompt, out.tokens], 1)
    ref = full_keys(large, seen)
    for layer in cache.layers:
        for h in range(2):
            slots = (layer.positions[0, h] == token).nonzero().flatten()
            assert len(slots) == 1, "the evicted token is back among the critical tokens"
            torch.testing.assert_close(
                layer.keys[0, h, slots[0]],
                ref.layers[layer.layer_idx].keys[0, h, token],
                atol=1e-5,
                rtol=0,
            )


@pytest.mark.parametrize("mode", ["paper", "renormalised"])
def test_marginal_path_equals_plain_reference(mode):
    g = torch.Generator().manual_seed(0)
    b, hkv, grp, q, n, s, m, d = 1, 2, 3, 2, 20, 6, 5, 4
    w = torch.rand(b, hkv, grp, q, n, generator=g)
    w = w / w.sum(-1, keepdim=True)
    crit_out = torch.randn(b, hkv, grp, q, d, generator=g)
    pos = torch.stack([torch.randperm(n, generator=g)[:s] for _ in range(hkv)])[None]
    pos[0, 0, -1] = -1  # an empty slot
    mpos = torch.full((b, hkv, m), -1)
    for h in range(hkv):
        rest = [t for t in range(n) if t not in pos[0, h].tolist()]
        mpos[0, h, : m - 1] = torch.tensor(rest[: m - 1])
    mval = torch.randn(b, hkv, m, d, generator=g)
    got = marginal_output(w, crit_out, pos, mpos, mval, mode)
    want = torch.zeros_like(crit_out)
    for h in range(hkv):
        for j in range(grp):
            for i in range(q):
                o_marg = torch.zeros(d)
                mass_marg = 0.0
                for slot in range(m):
                    tok = int(mpos[0, h, slot])
                    if tok >= 0:
                        o_marg += float(w[0, h, j, i, tok]) * mval[0, h, slot]
                        mass_marg += float(w[0, h, j, i, tok])
                if mode == "paper":
                    want[0, h, j, i] = crit_out[0, h, j, i] + o_marg
                else:
                    mass_crit = sum(float(w[0, h, j, i, int(t)]) for t in pos[0, h] if t >= 0)
                    total = mass_crit + mass_marg
                    want[0, h, j, i] = (mass_crit * crit_out[0, h, j, i] + o_marg) / total
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_matching_maps_every_large_head_to_a_small_head(pair, prompt):
    large, small = pair
    _method, out = run(large, small, prompt, budget=0.2, steps=2)
    src_layer, src_head = out.cache.state.mapping
    assert src_layer.shape == src_head.shape == (3, 8)
    assert int(src_layer.max()) < 2 and int(src_head.max()) < 4
    jaccard = out.cache.state.jaccard
    assert bool(((jaccard > 0) & (jaccard <= 1)).all())


def test_calibration_waits_for_100_tokens(pair):
    large, small = pair
    short = torch.randint(0, VOCAB, (1, 95), generator=torch.Generator().manual_seed(5))
    _, out = run(large, small, short, budget=0.2, steps=5)
    # 95 + 4 tokens seen < 100: still the full cache, exact
    assert out.cache.state is None or out.cache.state.mapping is None
    assert out.kv_bytes_ratio == 1.0
    _, out = run(large, small, short, budget=0.2, steps=8)
    assert out.cache.state.mapping is not None and out.cache.kv_bytes_ratio() < 1.0


def test_both_combinations_run_and_stay_close_to_full(pair, prompt):
    large, small = pair
    cont = generate(large, prompt, Full(), max_new_tokens=6).tokens
    ref = teacher_force(large, prompt, cont, Full())
    for combine in ("paper", "renormalised"):
        out = teacher_force(
            large, prompt, cont, SmallKV(assistant=small, budget=0.5, combine=combine)
        )
        assert torch.isfinite(out.logits).all()
        assert out.logits.shape == ref.logits.shape


def test_clone_with_per_row_budgets_matches_separate_runs(pair, prompt):
    large, small = pair
    cont = generate(large, prompt, Full(), max_new_tokens=5).tokens
    method = SmallKV(assistant=small, budget=0.2)
    cache, last, _ = prefill(large, prompt, method)
    both = decode(
        large,
        cache.clone(budgets=[0.2, 0.1], batch_repeat=2),
        last.repeat(2, 1),
        5,
        forced=cont.repeat(2, 1),
    )
    for row, budget in enumerate((0.2, 0.1)):
        alone = teacher_force(large, prompt, cont, SmallKV(assistant=small, budget=budget))
        torch.testing.assert_close(both.logits[row], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_configuration_errors_name_the_argument(pair):
    large, small = pair
    with pytest.raises(CacheConfigError, match="assistant"):
        SmallKV(budget=0.2)
    with pytest.raises(CacheConfigError, match="budget"):
        SmallKV(assistant=small, budget=0.0)
    with pytest.raises(CacheConfigError, match="split"):
        SmallKV(assistant=small, split=(0, 0, 2))
    with pytest.raises(CacheConfigError, match="combine"):
        SmallKV(assistant=small, combine="mean")  # type: ignore[arg-type]
    with pytest.raises(CacheConfigError, match="sinks"):
        SmallKV(assistant=small, sinks=-1)
    with pytest.raises(CacheConfigError, match="prior"):
        SmallKV(assistant=small, prior=1.5)
    other_vocab = tiny(0, 2, 4, 64, vocab=300)
    with pytest.raises(CacheConfigError, match="assistant"):
        SmallKV(assistant=other_vocab).attach(large)


def test_different_tokenizers_are_refused():
    class Tok:
        def __init__(self, vocab: dict[str, int]) -> None:
            self.vocab = vocab

        def __len__(self) -> int:
            return len(self.vocab)

        def get_vocab(self) -> dict[str, int]:
            return self.vocab

    check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1}))
    with pytest.raises(CacheConfigError, match="assistant"):
        check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}))


def test_keep_decoded_compresses_the_prompt_only(pair, prompt):
    large, small = pair
    _method, out = run(
        large, small, prompt, budget=0.2, steps=6, split=(2, 0, 2), keep_decoded=True
    )
    p = prompt.shape[1]
    n = p + 5  # compressed at the first decode step: 5 tokens decoded since
    prompt_allowance = round(0.2 * p + 0.5)
    keep, marginal = prompt_allowance * 2 // 4 + 5, 2 * prompt_allowance * 2 // 4
    for layer in out.cache.layers:
        for h in range(2):
            kept = set(layer.positions[0, h][layer.positions[0, h] >= 0].tolist())
            marg = layer.marginal_positions[0, h]
            marg = set(marg[marg >= 0].tolist())
            assert set(range(p, n)) <= kept and len(kept) == keep
            assert len(marg) == marginal and max(marg) < p and not kept & marg


def test_a_chunk_of_tokens_after_compression_is_kept_whole(pair, prompt):
    large, small = pair
    _, out = run(large, small, prompt, budget=0.05, steps=2)
    chunk = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = large(input_ids=chunk, cache=out.cache, use_cache=True).logits
    assert torch.isfinite(logits).all()
    n = out.cache.get_seq_length()
    for layer in out.cache.layers:
        for h in range(2):
            assert set(range(n - 30, n)) <= set(layer.positions[0, h].tolist())


def test_sinks_are_kept_in_every_head_at_any_budget(pair, prompt):
    large, small = pair
    _method, out = run(large, small, prompt, budget=0.05, steps=4, sinks=4)
    for layer in out.cache.layers:
        assert layer.compressed
        for h in range(2):
            assert {0, 1, 2, 3} <= set(layer.positions[0, h].tolist())


def test_value_norm_weights_each_token_by_its_large_model_value_norm(pair, prompt):
    large, small = pair
    plain, out = run(large, small, prompt, budget=0.2, steps=3, value_norm=False)
    weighted = SmallKV(assistant=small, budget=0.2, value_norm=True).attach(large)
    seen = torch.cat([prompt, out.tokens[:, :2]], 1)
    ref = full_keys(large, seen)
    p = prompt.shape[1]  # decoded tokens saw a compressed past: compare the prompt's
    for layer in out.cache.layers:
        base = plain.token_scores(out.cache, layer)[..., :p]
        norms = ref.layers[layer.layer_idx].values[..., :p, :].float().norm(dim=-1)
        got = weighted.token_scores(out.cache, layer)[..., :p]
        torch.testing.assert_close(got, base * norms, rtol=1e-4, atol=1e-6)


def test_the_prior_is_the_large_models_expected_attention_mixed_with_the_srm(pair, prompt):
    large, small = pair
    p = prompt.shape[1]
    ea = ExpectedAttention(budget=0.2, value_norm=False)
    ea_cache, last, _ = prefill(large, prompt, ea)
    decode(large, ea_cache, last, 2)
    only, out = run(large, small, prompt, budget=0.2, steps=3, prior=1.0, value_norm=False)
    srm, _ = run(large, small, prompt, budget=0.2, steps=3, prior=0.0, value_norm=False)
    half = SmallKV(assistant=small, budget=0.2, prior=0.5, value_norm=False).attach(large)
    for layer, ea_layer in zip(out.cache.layers, ea_cache.layers, strict=True):
        expected = ea_layer.state.prompt_scores[..., 4:p]  # past the 4 sinks the baseline pins
        torch.testing.assert_close(only.token_scores(out.cache, layer)[..., 4:p], expected)
        share = srm.token_scores(out.cache, layer)
        share = share / share.sum(-1, keepdim=True)
        mixed = half.token_scores(out.cache, layer)
        torch.testing.assert_close(mixed[..., 4:p], 0.5 * expected + 0.5 * share[..., 4:p])
        torch.testing.assert_close(mixed[..., p:], share[..., p:])  # decoded: the SRM alone


def test_the_srm_window_sum_is_the_plain_sum_of_its_last_window_query_rows():
    from collab_agent.cache import ObservedCache, use_kv_attention

    small = tiny(0, 2, 4, 64)
    ids = torch.randint(0, VOCAB, (2, 90), generator=torch.Generator().manual_seed(5))
    use_kv_attention(small)
    cache = ObservedCache(128, keep_last=True, window=16)
    with torch.no_grad():
        small(input_ids=ids[:, :60], cache=cache, use_cache=True)  # a prefill
        for t in range(60, 80):  # steps past a recompute of the sum (every 16 positions)
            small(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        small(input_ids=ids[:, 80:85], cache=cache, use_cache=True)  # a chunk
        small(input_ids=ids[:, 85:86], cache=cache, use_cache=True)
        plain = tiny(0, 2, 4, 64)  # the same weights, eager attention that returns weights
        plain.config._attn_implementation = "eager"
        weights = plain(input_ids=ids[:, :86], output_attentions=True).attentions
    for layer, probs in zip(cache.layers, weights, strict=True):
        torch.testing.assert_close(layer.window_sum, probs[:, :, -16:].sum(2), atol=1e-5, rtol=0)
