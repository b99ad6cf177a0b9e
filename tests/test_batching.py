"""Continuous batching and capacity limits, on tiny random-weight Qwen2 models (float32).

The claims: with greedy decoding each conversation's text is the same batched and alone (float32;
in bfloat16 a different batch shape may flip a near-tied token); requests join a running batch and
leave it when done; prefix caches stay correct across steps in the batch; one cancelled
conversation of 8 never disturbs the other 7; the batch, the waiting queue and the idle caches
stay bounded however many callers there are; limits are fair and never leak a slot.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation, Sampling
from collab_agent.backends.batching import BatchedTransformersBackend
from collab_agent.backends.local import TransformersBackend
from collab_agent.backends.tiny import TinyPair, tiny_qwen2
from collab_agent.errors import BackendError, CapabilityError, ConfigError
from collab_agent.limits import FairLimiter, LimitedBackend, OverloadedError, map_limited
from collab_agent.testing import ScriptedBackend

TOPICS = ("apples", "trains", "the sea", "prime numbers", "a red fox", "tea", "rivers", "chess")


def request(i: int, reasoning: str = "", **kwargs) -> GenerateRequest:
    kwargs.setdefault("stop", ())
    kwargs.setdefault("max_tokens", 6 + 2 * i)  # different lengths: rows leave at different steps
    kwargs.setdefault("sampling", GREEDY)
    kwargs.setdefault("logprobs", True)
    messages = [
        {"role": "system", "content": "Reason step by step."},
        {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}. " * (1 + i % 3)},
    ]
    return GenerateRequest(f"conv-{i}", messages, reasoning=reasoning, **kwargs)


async def alone(model, tokenizer, requests: list[GenerateRequest]) -> list[Generation]:
    """Each request on a fresh plain backend, one at a time (no batching, no shared cache)."""
    return [await TransformersBackend(model, tokenizer).generate(r) for r in requests]


async def together(backend: BatchedTransformersBackend, requests: list[GenerateRequest]):
    return await map_limited(backend.generate, requests, max_concurrency=len(requests))


def assert_same(batched: list[Generation], reference: list[Generation]) -> None:
    for got, want in zip(batched, reference, strict=True):
        assert got.text == want.text
        assert got.stop_reason == want.stop_reason
        assert got.completion_tokens == want.completion_tokens
        assert got.logprobs is not None and want.logprobs is not None
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-3)


@pytest.fixture
def small(tiny_pair: TinyPair):
    return tiny_pair.small, tiny_pair.tokenizer


# --------------------------------------------------------------------------- exactness
async def test_greedy_text_is_the_same_batched_and_alone(small) -> None:
    model, tokenizer = small
    requests = [request(i) for i in range(8)]
    requests[3] = request(3, stop=("e",))  # stop strings cut rows at different steps too
    backend = BatchedTransformersBackend(model, tokenizer, max_batch_size=4)

    batched = await together(backend, requests)

    assert_same(batched, await alone(model, tokenizer, requests))
    assert backend.peak_batch_size == 4  # 8 callers, 4 rows at a time: rows left and joined
    assert backend.prefill_passes < 8  # callers joining together were prefilled together
    assert backend.decode_steps < sum(g.completion_tokens for g in batched) / 2
    assert backend.batch_size == 0 and backend.waiting == 0


async def test_top_logprobs_are_the_same_batched_and_alone(small) -> None:
    model, tokenizer = small
    requests = [request(i, top_logprobs=3, stop=("e",)) for i in range(4)]
    batched = await together(BatchedTransformersBackend(model, tokenizer), requests)
    for got, want in zip(batched, await alone(model, tokenizer, requests), strict=True):
        assert got.top_logprobs is not None and want.top_logprobs is not None
        assert len(got.top_logprobs) == got.completion_tokens == len(want.top_logprobs)
        for g, w in zip(got.top_logprobs, want.top_logprobs, strict=True):
            assert set(g) == set(w) and all(abs(g[t] - w[t]) < 1e-3 for t in w)


async def test_seeded_sampling_is_the_same_batched_and_alone(small) -> None:
    model, tokenizer = small
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7)
    requests = [request(i, sampling=sampling, max_tokens=8) for i in range(4)]

    batched = await together(BatchedTransformersBackend(model, tokenizer), requests)

    assert [g.text for g in batched] == [g.text for g in await alone(model, tokenizer, requests)]


async def test_a_request_joins_a_running_batch_and_a_short_one_leaves_early(small) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(model, tokenizer)
    long_requests = [request(i, max_tokens=40) for i in range(2)]
    late = request(2, max_tokens=4)
    results: dict[str, Generation] = {}
    finished: list[str] = []

    async def run(req: GenerateRequest) -> None:
        results[req.conversation_id] = await backend.generate(req)
        finished.append(req.conversation_id)

    async with anyio.create_task_group() as group:
        for req in long_requests:
            group.start_soon(run, req)
        while backend.decode_steps < 3:  # noqa: ASYNC110 - the batch is running (a thread counts)
            await anyio.sleep(0.005)
        group.start_soon(run, late)

    assert backend.peak_batch_size == 3  # the late request joined the running batch
    assert finished[0] == late.conversation_id  # and left it before the long ones ended
    want = await alone(model, tokenizer, [*long_requests, late])
    assert_same([results[r.conversation_id] for r in (*long_requests, late)], want)


async def test_prefix_caches_stay_correct_across_steps_in_the_batch(small) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(model, tokenizer)
    first = await together(backend, [request(i, max_tokens=6) for i in range(4)])
    # the next step of each conversation continues the text it wrote, plus a blank line
    follow = [request(i, reasoning=g.text + "\n\n", max_tokens=8) for i, g in enumerate(first)]

    passes = backend.prefill_passes
    second = await together(backend, follow)

    assert backend.prefill_passes == passes + 1  # caches of different lengths, one forward
    assert all(g.cached_tokens > 0 for g in second)  # only the new tokens were prefilled
    assert all(g.cached_tokens < g.prompt_tokens for g in second)
    assert_same(second, await alone(model, tokenizer, follow))


async def test_reasoner_conversations_run_together_as_they_run_alone(small) -> None:
    """Four SmallOnly reasoning runs at once through `map_limited` (what ``abatch`` does):
    every step and answer is what the same run writes alone on the plain backend."""
    from collab_agent.policies.fixed import SmallOnly
    from collab_agent.reasoner import Reasoner

    model, tokenizer = small

    def reasoner(backend) -> Reasoner:
        return Reasoner(
            backend,
            backend,
            policy=SmallOnly(),
            sampling=GREEDY,
            budget=16,
            step_max_tokens=8,
            answer_max_tokens=4,
        )

    questions = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(4)]
    batched = BatchedTransformersBackend(model, tokenizer)
    together_traces = await map_limited(reasoner(batched).run, questions, max_concurrency=4)
    plain = TransformersBackend(model, tokenizer)
    alone_traces = [await reasoner(plain).run(q) for q in questions]

    for got, want in zip(together_traces, alone_traces, strict=True):
        assert [s.text for s in got.steps] == [s.text for s in want.steps]
        assert got.answer == want.answer
    assert batched.peak_batch_size == 4
    assert batched.cached_conversations == 0  # the reasoner released every conversation


# --------------------------------------------------------------------------- cancellation
@pytest.mark.parametrize("victim", [0, 5], ids=["the-driving-caller", "another-caller"])
async def test_one_cancelled_of_eight_leaves_the_other_seven_exact(small, victim: int) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(model, tokenizer)
    requests = [request(i, max_tokens=16) for i in range(8)]
    requests[victim] = request(victim, max_tokens=4000)  # it cannot finish before the cancel
    results: dict[int, Generation] = {}

    async def run(i: int) -> None:
        results[i] = await backend.generate(requests[i])

    async with anyio.create_task_group() as group:
        scopes = []
        for i in range(8):
            scope = anyio.CancelScope()
            scopes.append(scope)

            async def one(i: int = i, scope: anyio.CancelScope = scope) -> None:
                with scope:
                    await run(i)

            group.start_soon(one)
        while backend.decode_steps < 3:  # noqa: ASYNC110 - polled: a worker thread counts
            await anyio.sleep(0.005)
        scopes[victim].cancel()

    assert sorted(results) == [i for i in range(8) if i != victim]
    others = [requests[i] for i in sorted(results)]
    assert_same([results[i] for i in sorted(results)], await alone(model, tokenizer, others))
    assert backend.batch_size == 0 and backend.waiting == 0


async def test_a_cancelled_caller_alone_frees_its_row(small) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(model, tokenizer)
    with anyio.move_on_after(0.3):
        await backend.generate(request(0, max_tokens=4000))
    assert backend.batch_size == 0 and backend.waiting == 0
    # the backend still serves, exactly
    req = request(1)
    assert_same([await backend.generate(req)], await alone(model, tokenizer, [req]))


# --------------------------------------------------------------------------- bounds and errors
async def test_many_callers_never_hold_more_than_the_batch_and_the_cache_caps(small) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(
        model, tokenizer, max_batch_size=4, max_cached_conversations=8
    )
    requests = [request(i, max_tokens=2, logprobs=False) for i in range(100)]
    requests = [
        GenerateRequest(f"conv-{i}", r.messages, max_tokens=2, sampling=GREEDY, stop=())
        for i, r in enumerate(requests)
    ]

    results = await together(backend, requests)

    assert len(results) == 100 and all(g.completion_tokens >= 1 for g in results)
    assert backend.peak_batch_size == 4
    assert backend.cached_conversations <= 8


async def test_max_waiting_gives_backpressure(small) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(model, tokenizer, max_batch_size=1, max_waiting=2)
    results = await map_limited(
        backend.generate,
        [request(i, max_tokens=3) for i in range(4)],
        max_concurrency=4,
        return_exceptions=True,
    )
    assert sum(isinstance(r, OverloadedError) for r in results) >= 1
    assert sum(isinstance(r, Generation) for r in results) >= 2


async def test_a_failing_request_fails_alone(small) -> None:
    model, tokenizer = small
    backend = BatchedTransformersBackend(model, tokenizer)
    too_long = GenerateRequest("long", [{"role": "user", "content": "word " * 5000}], stop=())
    results = await map_limited(
        backend.generate,
        [request(0), too_long, request(1)],
        max_concurrency=3,
        return_exceptions=True,
    )
    assert isinstance(results[1], BackendError) and "context" in str(results[1])
    assert_same([results[0], results[2]], await alone(model, tokenizer, [request(0), request(1)]))


def test_bad_arguments_name_themselves(small) -> None:
    model, tokenizer = small
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatchedTransformersBackend(model, tokenizer, max_batch_size=0)
    with pytest.raises(ConfigError, match="batch_window_s"):
        BatchedTransformersBackend(model, tokenizer, batch_window_s=-1)


def test_sliding_window_models_are_refused() -> None:
    model, tokenizer = tiny_qwen2(0, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(CapabilityError, match="full attention"):
        BatchedTransformersBackend(model, tokenizer)


# --------------------------------------------------------------------------- limits
async def test_fair_limiter_serves_conversations_round_robin() -> None:
    limiter = FairLimiter(1)
    order: list[str] = []
    await limiter.acquire("holder")

    async def call(key: str) -> None:
        async with limiter.slot(key):
            order.append(key)

    async with anyio.create_task_group() as group:
        for key in ["a", "a", "a", "b", "c"]:  # "a" floods the queue first
            group.start_soon(call, key)
            await anyio.lowlevel.checkpoint()
        await anyio.sleep(0.01)
        limiter.release()

    assert order == ["a", "b", "c", "a", "a"]
    assert limiter.in_use == 0 and limiter.waiting == 0


async def test_fair_limiter_never_leaks_a_slot_on_cancellation() -> None:
    limiter = FairLimiter(1)
    await limiter.acquire()
    with anyio.move_on_after(0.01):
        await limiter.acquire("late")  # cancelled while waiting
    assert limiter.waiting == 0
    limiter.release()
    assert limiter.in_use == 0
    with anyio.fail_after(1):
        async with limiter.slot():
            assert limiter.in_use == 1


async def test_fair_limiter_max_waiting_raises() -> None:
    limiter = FairLimiter(1, max_waiting=1)
    await limiter.acquire()
    async with anyio.create_task_group() as group:
        group.start_soon(limiter.acquire, "a")
        await anyio.sleep(0.01)
        with pytest.raises(OverloadedError, match="max_waiting"):
            await limiter.acquire("b")
        group.cancel_scope.cancel()
    with pytest.raises(ConfigError, match="capacity"):
        FairLimiter(0)


async def test_limited_backend_keeps_at_most_capacity_calls_in_flight() -> None:
    inner = ScriptedBackend(["step"] * 50, delay=0.01)
    backend = LimitedBackend(inner, capacity=4)
    requests = [GenerateRequest(f"c{i}", [{"role": "user", "content": "hi"}]) for i in range(50)]
    results = await map_limited(backend.generate, requests, max_concurrency=50)
    assert [g.text for g in results] == ["step"] * 50
    assert backend.limiter.peak_in_use == 4
    assert backend.name == inner.name and backend.requests is inner.requests


async def test_map_limited_keeps_order_bounds_concurrency_and_raises() -> None:
    running = peak = 0

    async def work(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001 * (x % 3))
        running -= 1
        if x == 13:
            raise ValueError("thirteen")
        return x * x

    assert await map_limited(work, range(10), max_concurrency=3) == [x * x for x in range(10)]
    assert peak == 3
    with pytest.raises(ValueError, match="thirteen"):
        await map_limited(work, range(20), max_concurrency=4)
    mixed = await map_limited(work, range(15), max_concurrency=4, return_exceptions=True)
    assert isinstance(mixed[13], ValueError) and mixed[14] == 196
    with pytest.raises(ConfigError, match="max_concurrency"):
        await map_limited(work, [], max_concurrency=0)


# --------------------------------------------------------------------------- the real 0.5B
@pytest.mark.slow
async def test_real_small_model_greedy_text_is_the_same_batched_and_alone() -> None:
    """The bundled 0.5B in float32 (bf16 batching may flip near-tied tokens): 4 conversations
    batched write what each writes alone, in fewer forward passes."""
    import torch

    from collab_agent.backends import bundled

    name = bundled.DEFAULT_SMALL
    if not bundled.is_installed(name):
        pytest.skip(f"bundled model {name} is not installed")
    backend = BatchedTransformersBackend.from_pretrained(f"bundled:{name}", dtype=torch.float32)
    assert isinstance(backend, BatchedTransformersBackend)
    requests = [
        GenerateRequest(
            f"real-{i}",
            [{"role": "user", "content": f"What is {i + 2} times {i + 7}? Think step by step."}],
            max_tokens=8 + 2 * i,
            sampling=GREEDY,
            logprobs=True,
        )
        for i in range(4)
    ]

    batched = await together(backend, requests)

    assert_same(batched, await alone(backend.model, backend.tokenizer, requests))
    assert backend.peak_batch_size == 4
    assert all(g.text.strip() for g in batched)


# --------------------------------------------------------------------------- the command
def test_bench_batch_prints_the_fixed_json_keys() -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from collab_agent.bench.batch import register

    bench = typer.Typer()
    register(bench)
    bench.command("noop")(lambda: None)  # keep "batch" a subcommand
    args = ["batch", "--models", "tiny", "--concurrency", "1,16", "--max-tokens", "2"]
    result = CliRunner().invoke(bench, [*args, "--rounds", "2", "--json"])

    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["concurrency"] == [1, 16] and figures["rounds"] == 2
    low, mid, high = (figures[k] for k in ("tokens_per_s_min", "tokens_per_s", "tokens_per_s_max"))
    assert all(0 < a <= b <= c for a, b, c in zip(low, mid, high, strict=True))
    assert set(figures["ceiling_by_dtype"]) == {"bfloat16", "float32"}
    assert figures["ceiling_tokens_per_s"] == [
        max(pair) for pair in zip(*figures["ceiling_by_dtype"].values(), strict=True)
    ]
    assert len(figures["ceiling_decode_tokens_per_s"]) == 2
    assert all(x > 0 for x in figures["ceiling_decode_tokens_per_s"])
    assert figures["llamacpp_tokens_per_s"] == [None, None]  # no GGUF for a tiny model
    assert figures["speedup_16_vs_1"] == pytest.approx(mid[1] / mid[0], rel=1e-2)
    assert figures["vs_ceiling_16"] == pytest.approx(
        mid[1] / figures["ceiling_tokens_per_s"][1], rel=1e-2
    )
    assert figures["peak_batch_size"] == 16 and figures["peak_rss_bytes"] > 0
    bad = CliRunner().invoke(bench, [*args, "--rounds", "0"])
    assert bad.exit_code != 0 and "--rounds" in str(bad.exception or bad.output)


async def test_a_stop_string_across_tokens_cuts_batched_rows_as_alone(small) -> None:
    """Stop strings that begin inside one token and end inside a later one, found by the
    incremental detokeniser in the batch as by the plain backend."""
    model, tokenizer = small
    free = await alone(model, tokenizer, [request(i, max_tokens=20) for i in range(4)])
    requests = []
    for i, generation in enumerate(free):
        ids = tokenizer(generation.text, add_special_tokens=False)["input_ids"]
        start = len(tokenizer.decode(ids[:3])) - 1
        stop = generation.text[start : len(tokenizer.decode(ids[:5])) + 1]
        requests.append(request(i, max_tokens=20, stop=(stop,)))

    batched = await together(BatchedTransformersBackend(model, tokenizer), requests)

    assert_same(batched, await alone(model, tokenizer, requests))
    for got, generation, req in zip(batched, free, requests, strict=True):
        assert got.stop_reason == "step" and got.stop_string == req.stop[0]
        assert got.text == generation.text[: generation.text.find(req.stop[0])]


async def test_a_large_batch_computes_in_its_own_dtype_and_writes_what_it_writes_alone(
    small,
) -> None:
    """From ``large_batch_from`` rows on the batch decodes in ``large_batch_dtype`` (float64
    here, to stand for CPU float32 over bf16): the texts are those each conversation writes alone
    in that dtype, and the caches move between dtypes as the batch shrinks and grows."""
    import copy

    import torch

    model, tokenizer = small
    requests = [request(i) for i in range(4)]
    backend = BatchedTransformersBackend(
        model, tokenizer, large_batch_dtype=torch.float64, large_batch_from=2
    )

    batched = await together(backend, requests)
    again = await together(backend, requests[:1])  # alone: back in float32 on its cached prefix

    wide = copy.deepcopy(model).double()
    assert_same(batched, await alone(wide, tokenizer, requests))
    assert_same(again, await alone(model, tokenizer, requests[:1]))
    assert 0 < backend.large_batch_steps < backend.decode_steps  # the last row went on alone
    assert backend.model.dtype == torch.float32


def test_cpu_batch_dtypes_switch_only_when_the_user_did_not_choose() -> None:
    import torch

    from collab_agent.backends.batching import cpu_batch_dtypes

    assert cpu_batch_dtypes("auto", "cpu") == (torch.bfloat16, torch.float32)
    assert cpu_batch_dtypes("bfloat16", "cpu") == (torch.bfloat16, None)
    assert cpu_batch_dtypes(torch.float32, "cpu") == (torch.float32, None)
    with pytest.raises(ConfigError, match="dtype"):
        cpu_batch_dtypes("float33", "cpu")
