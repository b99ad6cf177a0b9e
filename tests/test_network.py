"""SimulatedLink: the edge-cloud link of TrigReason's experiment, around any backend."""

from __future__ import annotations

import time

import pytest

from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.backends.network import Price, SimulatedLink
from collab_agent.errors import ConfigError
from collab_agent.testing import ScriptedBackend, ScriptedStep

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def request() -> GenerateRequest:
    return GenerateRequest("c", MESSAGES, reasoning="First, ", logprobs=True)


async def test_link_adds_rtt_transfer_ttft_and_per_token_time() -> None:
    backend = ScriptedBackend([ScriptedStep("two plus three", logprobs=[-0.1, -0.2, -0.3])])
    link = SimulatedLink(
        backend, rtt_s=0.1, bandwidth_bytes_s=1e9, ttft_s=0.2, per_token_s=0.05, sleep=False
    )
    generation = await link.generate(request())
    expected = 0.1 + 0.2 + 3 * 0.05
    assert generation.seconds == pytest.approx(expected, abs=1e-3)
    assert link.delay_total_s == pytest.approx(expected, abs=1e-3)
    assert generation.text == "two plus three" and backend.calls == 1


async def test_bandwidth_charges_the_bytes_sent_and_received() -> None:
    slow = SimulatedLink(ScriptedBackend(["x"]), rtt_s=0.0, bandwidth_bytes_s=1000.0, sleep=False)
    fast = SimulatedLink(ScriptedBackend(["x"]), rtt_s=0.0, bandwidth_bytes_s=1e12, sleep=False)
    assert (await slow.generate(request())).seconds > 0.05  # about 80 bytes of JSON each way
    assert (await fast.generate(request())).seconds < 1e-3


async def test_sleeping_link_really_waits() -> None:
    link = SimulatedLink(ScriptedBackend(["x"]), rtt_s=0.3)
    start = time.perf_counter()
    generation = await link.generate(request())
    assert time.perf_counter() - start >= 0.3
    assert generation.seconds >= 0.3


async def test_price_turns_tokens_into_cost() -> None:
    link = SimulatedLink(
        ScriptedBackend(["a b c d"]), price=Price(input=1.0, output=4.0), rtt_s=0.0, sleep=False
    )
    generation = await link.generate(request())
    expected = (generation.prompt_tokens * 1.0 + generation.completion_tokens * 4.0) / 1e6
    assert generation.cost == pytest.approx(expected) and generation.cost > 0


def test_cached_tokens_are_priced_at_the_cached_rate() -> None:
    price = Price(input=2.0, cached=0.5, output=8.0)
    assert price.cost(1_000_000, 600_000, 1_000_000) == pytest.approx(0.4 * 2 + 0.6 * 0.5 + 8)
    assert Price(input=2.0).cost(1_000_000, 1_000_000, 0) == pytest.approx(2.0)


async def test_release_reaches_the_wrapped_backend() -> None:
    backend = ScriptedBackend(["x"])
    await SimulatedLink(backend).release("conversation-1")
    assert backend.released == ["conversation-1"]


def test_bad_settings_name_the_argument() -> None:
    with pytest.raises(ConfigError, match="rtt_s"):
        SimulatedLink(ScriptedBackend(["x"]), rtt_s=-1)
    with pytest.raises(ConfigError, match="bandwidth_bytes_s"):
        SimulatedLink(ScriptedBackend(["x"]), bandwidth_bytes_s=0)
    with pytest.raises(ConfigError, match="backend"):
        SimulatedLink(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="output"):
        Price(output=-1)


class CountingBackend:
    """Writes two steps then the answer, judges every step 9/9; tokens are words."""

    def __init__(self, name: str, logprob: float) -> None:
        self.name = name
        self.logprob = logprob

    async def generate(self, request: GenerateRequest) -> Generation:
        if request.purpose == "judge":
            text = "9"
        elif request.purpose == "answer":
            text = " 18"
        else:
            steps = request.reasoning.count("\n\n")
            text = "Final answer: 18" if steps >= 2 else f"Step {steps}: add the eggs up."
        words = len(text.split())
        return Generation(
            text=text,
            stop_reason="step",
            logprobs=[self.logprob] * words if request.logprobs else None,
            prompt_tokens=len(request.reasoning.split()) + 20,
            completion_tokens=words,
        )


async def test_edge_cloud_bench_reports_the_design_keys() -> None:
    from collab_agent.bench.edge_cloud import run_bench

    problems = [{"id": "p1", "question": "Janet's ducks ...", "answer": "18"}]
    results = await run_bench(
        CountingBackend("srm", -1.0),
        CountingBackend("lrm", -0.5),
        problems,
        ["large-only", "trigreason"],
        rtt_s=0.1,
        bandwidth_bytes_s=1e6,
        ttft_s=0.0,
        per_token_s=0.0,
        price=Price(input=1.0, output=2.0),
        sleep=False,
        reasoner_options={"budget": 256},
        policy_options={"trigreason": {"priming_steps": 1}},
    )
    keys = {"small_token_share", "small_step_share", "lrm_calls", "lrm_input_tokens"}
    keys |= {"lrm_output_tokens", "latency_s", "cost", "accuracy"}
    for name in ("large-only", "trigreason"):
        assert keys <= set(results[name])
        assert results[name]["accuracy"] == 1.0
    assert results["large-only"]["small_token_share"] == 0.0
    assert results["trigreason"]["small_token_share"] > 0.0
    assert results["trigreason"]["lrm_calls"] < results["large-only"]["lrm_calls"]
    # the link's delay counts in latency even when it is only accounted, not slept
    assert results["large-only"]["latency_s"] >= 0.1 * results["large-only"]["lrm_calls"]
    ratio = results["trigreason"]["vs_large_only"]
    assert ratio["lrm_calls"] == pytest.approx(
        results["trigreason"]["lrm_calls"] / results["large-only"]["lrm_calls"]
    )
