"""`collab-agent bench edge-cloud`: latency, LRM calls and API cost of policies across a link.

TrigReason's edge-cloud experiment (Zhao, Peng, Nguyen et al., 2026, Sec. "Edge-cloud
collaboration") runs the small model on the device and the large one behind an API, and reports
that TrigReason cuts latency by 43.9% and API cost by 73.3% against SpecReason. This benchmark
puts the large model behind a `SimulatedLink` (round trip ``--rtt``, bandwidth, time to first
token, per-token time, API price) and runs the same GSM8K problems under LRM-only, SpecReason
(when that policy exists) and TrigReason through `Reasoner`, printing per policy the fixed keys
of DESIGN.md: ``small_token_share``, ``small_step_share``, ``lrm_calls``, ``lrm_input_tokens``,
``lrm_output_tokens``, ``latency_s``, ``cost`` (plus ``accuracy`` and a few more). The
``trigreason`` object also holds ``vs_large_only`` and ``vs_specreason``: its figures divided by
theirs.

By default both models are llama.cpp servers on this machine (``--models llamacpp``), 3-8x faster
than transformers on a CPU; latency is wall-clock: the models' real compute plus the link.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.backends.base import close_backends
from collab_agent.cli.options import JsonOption, LargeOption, SmallOption

if TYPE_CHECKING:
    from collab_agent.backends.base import Backend

RATIO_KEYS = ("latency_s", "cost", "lrm_calls", "lrm_input_tokens", "lrm_output_tokens")
DEFAULT_POLICIES = "large-only,specreason,trigreason"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarise(traces: list[Any], correct: list[bool], link_delay_s: float) -> dict[str, Any]:
    """The per-policy figures over a list of traces (token shares are pooled over problems)."""
    small_tokens = sum(t.tokens_by("small") for t in traces)
    all_tokens = sum(t.reasoning_tokens for t in traces)
    small_steps = sum(sum(s.author == "small" for s in t.steps) for t in traces)
    all_steps = sum(len(t.steps) for t in traces)
    large = [t.usage["large"] for t in traces]
    small = [t.usage["small"] for t in traces]
    latency = sum(t.seconds for t in traces) + link_delay_s
    return {
        "problems": len(traces),
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "small_token_share": small_tokens / all_tokens if all_tokens else 0.0,
        "small_step_share": small_steps / all_steps if all_steps else 0.0,
        "lrm_calls": sum(u.calls for u in large),
        "lrm_input_tokens": sum(u.prompt_tokens for u in large),
        "lrm_cached_tokens": sum(u.cached_tokens for u in large),
        "lrm_output_tokens": sum(u.completion_tokens for u in large),
        "srm_calls": sum(u.calls for u in small),
        "srm_output_tokens": sum(u.completion_tokens for u in small),
        "latency_s": latency,
        "latency_s_per_problem": latency / len(traces) if traces else 0.0,
        "cost": sum(t.cost for t in traces),
        "degraded_steps": sum(t.degraded_steps for t in traces),
        "steps": all_steps,
    }


def ratios(numerator: dict[str, Any], denominator: dict[str, Any]) -> dict[str, float | None]:
    """``numerator[k] / denominator[k]`` for the headline keys (``None`` where it is 0)."""
    return {k: (numerator[k] / denominator[k] if denominator.get(k) else None) for k in RATIO_KEYS}


async def run_bench(
    small: Backend,
    large: Backend,
    problems: list[dict[str, Any]],
    policies: list[str],
    *,
    rtt_s: float,
    bandwidth_bytes_s: float,
    ttft_s: float,
    per_token_s: float,
    price: Any,
    sleep: bool,
    reasoner_options: dict[str, Any],
    policy_options: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Run every policy on every problem with ``large`` behind a fresh `SimulatedLink`."""
    from collab_agent.backends.network import SimulatedLink
    from collab_agent.core.reasoner import Reasoner
    from collab_agent.evaluation.grading import extract_answer, is_correct
    from collab_agent.policies.registry import resolve_policy

    results: dict[str, Any] = {}
    for name in policies:
        policy = resolve_policy(name, allow_code=True, **policy_options.get(name, {}))
        link = SimulatedLink(
            large,
            rtt_s=rtt_s,
            bandwidth_bytes_s=bandwidth_bytes_s,
            ttft_s=ttft_s,
            per_token_s=per_token_s,
            price=price,
            sleep=sleep,
        )
        reasoner = Reasoner(small, link, policy=policy, **reasoner_options)
        traces, correct = [], []
        for i, problem in enumerate(problems):
            started = time.perf_counter()
            trace = await reasoner.run(
                [{"role": "user", "content": problem["question"]}],
                conversation_id=f"{name}-{problem.get('id', i)}",
            )
            ok = is_correct(extract_answer(trace.answer), str(problem["answer"]))
            traces.append(trace)
            correct.append(ok)
            _log(
                f"[{name}] {problem.get('id', i)}: {'right' if ok else 'wrong'} "
                f"(answer {trace.answer[:40]!r}, ref {problem['answer']}), "
                f"{len(trace.steps)} steps, small share {trace.small_token_share:.2f}, "
                f"{time.perf_counter() - started:.1f}s"
            )
        results[name] = summarise(traces, correct, 0.0 if sleep else link.delay_total_s)
        results[name]["link_delay_s"] = link.delay_total_s
        _log(f"[{name}] summary: {json.dumps(results[name])}")
    if "trigreason" in results:
        for other, key in (("large-only", "vs_large_only"), ("specreason", "vs_specreason")):
            if other in results:
                results["trigreason"][key] = ratios(results["trigreason"], results[other])
    return results


def register(bench: typer.Typer) -> None:
    """Add ``edge-cloud`` to the ``bench`` sub-app."""

    @bench.command("edge-cloud")
    def edge_cloud(
        models: Annotated[
            str | None,
            typer.Option("--models", help="Preset pair: llamacpp (default), bundled or tiny."),
        ] = None,
        small: SmallOption = None,
        large: LargeOption = None,
        problems: Annotated[int, typer.Option(help="GSM8K problems to run.")] = 3,
        rtt: Annotated[float, typer.Option("--rtt", help="Round-trip time, seconds.")] = 0.1,
        bandwidth: Annotated[float, typer.Option(help="Link bandwidth, bytes/s.")] = 1.25e6,
        ttft: Annotated[float, typer.Option(help="Extra time to first token, seconds.")] = 0.0,
        per_token: Annotated[float, typer.Option(help="Extra seconds per LRM token.")] = 0.0,
        price_input: Annotated[float, typer.Option(help="LRM price per M input tokens.")] = 0.55,
        price_cached: Annotated[float, typer.Option(help="Per M cached input tokens.")] = 0.14,
        price_output: Annotated[float, typer.Option(help="Per M output tokens.")] = 2.19,
        policies: Annotated[
            str, typer.Option(help="Comma-separated policy names.")
        ] = DEFAULT_POLICIES,
        priming: Annotated[int, typer.Option(help="TrigReason's priming steps.")] = 2,
        budget: Annotated[int, typer.Option(help="Most reasoning tokens per problem.")] = 768,
        step_tokens: Annotated[int, typer.Option(help="Most tokens per step.")] = 192,
        temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
        threads: Annotated[
            int, typer.Option(help="CPU threads per llama.cpp server (1 is fastest on a busy CPU).")
        ] = 1,
        sleep: Annotated[
            bool, typer.Option("--sleep/--no-sleep", help="Really wait the link's delays.")
        ] = True,
        as_json: JsonOption = False,
    ) -> None:
        """LRM-only vs SpecReason vs TrigReason with the LRM behind a simulated link."""
        import anyio

        from collab_agent.backends.specs import load_backend, resolve_pair
        from collab_agent.bench.prefix_reuse import load_problems
        from collab_agent.types import Price, Sampling

        names = [p.strip() for p in policies.split(",") if p.strip()]
        small_spec, large_spec = resolve_pair(models or "llamacpp", small, large)
        data = load_problems(problems)
        _log(f"edge-cloud: small={small_spec} large={large_spec} problems={len(data)} rtt={rtt}s")
        backends: list[Any] = []

        async def main() -> dict[str, Any]:
            try:
                for spec in (small_spec, large_spec):
                    _log(f"loading {spec} ...")
                    options: dict[str, Any] = (
                        {"threads": threads} if spec.startswith("llamacpp:") else {}
                    )
                    backends.append(load_backend(spec, **options))
                return await run_bench(
                    backends[0],
                    backends[1],
                    data,
                    names,
                    rtt_s=rtt,
                    bandwidth_bytes_s=bandwidth,
                    ttft_s=ttft,
                    per_token_s=per_token,
                    price=Price(input=price_input, cached=price_cached, output=price_output),
                    sleep=sleep,
                    reasoner_options={
                        "budget": budget,
                        "step_max_tokens": step_tokens,
                        "answer_max_tokens": 48,
                        "sampling": Sampling(
                            temperature=temperature, top_p=1.0 if temperature == 0 else 0.95
                        ),
                    },
                    policy_options={"trigreason": {"priming_steps": priming}},
                )
            finally:
                await close_backends(*backends)

        results = anyio.run(main)
        if as_json:
            print(json.dumps(results))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"edge-cloud, {len(data)} GSM8K problems, RTT {rtt * 1000:.0f} ms")
        keys = ("accuracy", "small_token_share", *RATIO_KEYS)
        table.add_column("policy")
        for key in keys:
            table.add_column(key, justify="right")
        for name, row in results.items():
            table.add_row(name, *(f"{row[k]:.4g}" for k in keys))
        Console().print(table)
        for key in ("vs_large_only", "vs_specreason"):
            if key in results.get("trigreason", {}):
                shown = {
                    k: round(v, 3) if v is not None else None
                    for k, v in results["trigreason"][key].items()
                }
                Console().print(f"trigreason {key}: {shown}")
