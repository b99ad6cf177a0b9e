"""Time to the first streamed token: `CollabChatModel.astream` on the bundled llama.cpp pair
against the large model's own first token (an `OpenAIBackend` stream on the same server).

TrigReason primes with the large model, so the collaboration's first visible token is the large
model's first reasoning token; what it adds is the rendering of its prompt (``/apply-template``)
and the policy's bookkeeping. Each repetition asks a new question of both arms, the order
alternating, so the prompt caches favour neither. Prints one JSON object (seconds, median, min,
max per arm, and the ratio of medians).

    PYTHONPATH=. python benchmarks/stream_ttft.py --repeat 3 > benchmarks/results/stream_ttft.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from collab_agent.backends.base import GenerateRequest
from collab_agent.backends.specs import PRESETS, load_backend
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


async def main(repeat: int, threads: int) -> dict[str, Any]:
    small_spec, large_spec = PRESETS["llamacpp"]
    small = load_backend(small_spec, threads=threads)
    large = load_backend(large_spec, threads=threads)
    model = CollabChatModel(small=small, large=large, temperature=0, max_tokens=32)
    try:
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
    finally:
        for backend in (small, large):
            await backend.aclose()  # type: ignore[attr-defined]
    return {
        "pair": [small_spec, large_spec],
        "threads": threads,
        "collab_astream_ttft": summary(collab),
        "large_alone_stream_ttft": summary(alone),
        "ratio_of_medians": round(statistics.median(collab) / statistics.median(alone), 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.repeat, args.threads)), indent=2))
