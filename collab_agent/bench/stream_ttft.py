"""Time to the first streamed token: `CollabChatModel.astream` on the bundled llama.cpp pair
against the large model's own first token (an `OpenAIBackend` stream on the same server).

TrigReason primes with the large model, so the collaboration's first visible token is the large
model's first reasoning token; what it adds is the rendering of its prompt (``/apply-template``)
and the policy's bookkeeping. Each repetition asks a new question of both arms, the order
alternating, so the prompt caches favour neither. Prints one JSON object (seconds, median, min,
max per arm, and the ratio of medians).

    collab-agent bench stream-ttft --repeat 3 > benchmarks/results/stream_ttft.json
"""

from __future__ import annotations

import json
import statistics
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.backends.base import GenerateRequest
from collab_agent.cli.backends import run_then_close

if TYPE_CHECKING:
    from collab_agent.chat_model import CollabChatModel

QUESTIONS = [
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "What is the sum of the first 20 odd numbers?",
    "A shop sells pens at 3 for $2. How much do 18 pens cost?",
    "How many minutes are there in 3.5 days?",
    "If 4 workers build a wall in 6 days, how long do 3 workers take?",
]


async def collab_ttft(model: CollabChatModel, question: str) -> float:
    start = time.perf_counter()
    stream = model.astream(question)
    try:
        async for chunk in stream:
            if chunk.content or chunk.additional_kwargs.get("reasoning_content"):
                return time.perf_counter() - start
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    raise RuntimeError("the collaboration streamed no text")


async def large_ttft(large: Any, question: str) -> float:
    request = GenerateRequest(
        conversation_id=f"alone-{question}",
        messages=[{"role": "user", "content": question}],
        stop=(),
        max_tokens=32,
    )
    start = time.perf_counter()
    stream = large.stream(request)
    try:
        async for item in stream:
            if isinstance(item, str):
                return time.perf_counter() - start
    finally:
        await stream.aclose()
    raise RuntimeError("the large model streamed no text")


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "seconds": [round(v, 3) for v in values],
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


async def interleaved(
    model: CollabChatModel, large: Any, repeat: int
) -> tuple[list[float], list[float]]:
    """``repeat`` first-token times of each arm (collaboration, large model alone), after one
    warm-up each, the order alternating."""
    await collab_ttft(model, "What is 1 + 1?")  # warm-up: templates, connections
    await large_ttft(large, "What is 1 + 1?")
    collab: list[float] = []
    alone: list[float] = []
    for i in range(repeat):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i % 2 == 0:
            collab.append(await collab_ttft(model, question))
            alone.append(await large_ttft(large, question))
        else:
            alone.append(await large_ttft(large, question))
            collab.append(await collab_ttft(model, question))
    return collab, alone


def measure(repeat: int, threads: int) -> dict[str, Any]:
    """Load the bundled llama.cpp pair, time both arms, and free the servers."""
    from collab_agent.backends.specs import PRESETS, load_backend
    from collab_agent.chat_model import CollabChatModel

    small_spec, large_spec = PRESETS["llamacpp"]
    small = load_backend(small_spec, threads=threads)
    large = load_backend(large_spec, threads=threads)
    model = CollabChatModel(small=small, large=large, temperature=0, max_tokens=32)
    collab, alone = run_then_close(lambda: interleaved(model, large, repeat), small, large)
    return {
        "pair": [small_spec, large_spec],
        "threads": threads,
        "collab_astream_ttft": summary(collab),
        "large_alone_stream_ttft": summary(alone),
        "ratio_of_medians": round(statistics.median(collab) / statistics.median(alone), 3),
    }


def stream_ttft(
    repeat: Annotated[int, typer.Option(help="Questions each arm answers (timed).")] = 3,
    threads: Annotated[int, typer.Option(help="CPU threads of each llama.cpp server.")] = 1,
) -> None:
    """Time to the first streamed token: the collaboration's astream against the large model's
    own stream, on the bundled llama.cpp pair."""
    print(json.dumps(measure(repeat, threads), indent=2))


def register(bench: typer.Typer) -> None:
    """Add ``stream-ttft`` to the ``bench`` sub-app."""
    bench.command("stream-ttft")(stream_ttft)


if __name__ == "__main__":
    from collab_agent.cli.entry import run_alone

    run_alone(stream_ttft)
