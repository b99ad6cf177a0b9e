"""What a sync ``invoke``'s bridge costs: one portal call for the whole call (``_generate``'s)
against one portal call per chunk (a sync iterator over the async stream, the bridge it
replaced), on scripted models that answer at once.

The two arms run the same `stream_chunks` core on the same model; only the bridge differs. The
script has ``steps`` reasoning steps, so a call yields ``steps + 2`` chunks. Arms alternate in
every round after one warm-up each; prints one JSON object (milliseconds per call, median, min,
max per arm, and the ratio of medians, per-chunk over whole-call).

    python -m collab_agent.bench.sync_invoke --steps 40 --repeat 15
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer


def _model(steps: int) -> Any:
    from collab_agent.chat_model import CollabChatModel
    from collab_agent.policies import SmallOnly
    from collab_agent.testing import ScriptedBackend

    script = [f"Step {i}." for i in range(steps)] + ["Final answer: 42"]
    return CollabChatModel(
        small=ScriptedBackend(script * 1000, name="srm"),
        large=ScriptedBackend([], name="lrm"),
        policy=SmallOnly(),
        max_steps=steps + 1,
        stream_granularity="step",
    )


def _bridges(model: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(whole call, per chunk): ``_generate``'s bridge, and the former one that pulled the async
    chunks one portal call at a time, then aggregated them; both below LangChain's ``invoke``."""
    from langchain_core.messages import BaseMessage, HumanMessage

    from collab_agent import _portal
    from collab_agent.langchain.call import generate, stream_chunks
    from collab_agent.langchain.messages import aggregate

    messages: list[BaseMessage] = [HumanMessage("6 * 7?")]
    return (
        lambda: _portal.run_sync(generate, model, messages, None, {}, None),
        lambda: aggregate(
            list(_portal.iterate_sync(lambda: stream_chunks(model, messages, None, {}, None)))
        ),
    )


def _ms(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = call()
    elapsed = (time.perf_counter() - start) * 1000
    message = result.generations[0].message
    if message.content != "42":
        raise RuntimeError(f"the call answered {message.content!r}, not '42'")
    return elapsed


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "ms": [round(v, 2) for v in values],
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def measure(steps: int, repeat: int) -> dict[str, Any]:
    """Time both bridges ``repeat`` times each, alternating which goes first."""
    model = _model(steps)
    whole, per_chunk = _bridges(model)
    _ms(whole), _ms(per_chunk)  # warm-up: imports, the first portal thread
    arms: dict[str, list[float]] = {"whole_call": [], "per_chunk": []}
    for i in range(repeat):
        order = [("whole_call", whole), ("per_chunk", per_chunk)]
        for name, call in order if i % 2 == 0 else order[::-1]:
            arms[name].append(_ms(call))
    return {
        "steps": steps,
        "chunks_per_call": steps + 2,
        "invoke_whole_call_portal": summary(arms["whole_call"]),
        "per_chunk_portal_calls": summary(arms["per_chunk"]),
        "ratio_of_medians": round(
            statistics.median(arms["per_chunk"]) / statistics.median(arms["whole_call"]), 3
        ),
    }


def sync_invoke(
    steps: Annotated[int, typer.Option(help="Reasoning steps of each call.")] = 40,
    repeat: Annotated[int, typer.Option(help="Timed calls of each arm.")] = 15,
) -> None:
    """A sync invoke's bridge cost: one portal call per call against one per chunk."""
    print(json.dumps(measure(steps, repeat), indent=2))


if __name__ == "__main__":
    from collab_agent.cli.entry import run_alone

    run_alone(sync_invoke)
