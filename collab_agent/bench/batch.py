"""``collab-agent bench batch``: throughput of concurrent conversations on one local model.

For each concurrency ``c`` (default 1, 4, 16), ``c`` conversations (or ``--requests``) go
through `map_limited` with ``max_concurrency=c`` (what a chat model's ``abatch`` does) to a
`BatchedTransformersBackend`; tokens per second are generated tokens over wall time. The
decode steps of concurrent conversations share one forward pass (continuous batching), so
throughput grows with concurrency while the weights are read once per step.

JSON keys (fixed, DESIGN.md): ``concurrency``, ``tokens_per_s``, ``speedup_16_vs_1``,
``peak_rss_bytes``; also ``seconds``, ``completion_tokens``, ``peak_batch_size``,
``unbatched_tokens_per_s`` (one conversation on the plain `TransformersBackend`), ``model``,
``dtype``, ``max_tokens``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Annotated, Any

import typer

from collab_agent.cli_options import JsonOption

TOPICS = (
    "a lighthouse keeper",
    "a lost robot",
    "the first city on Mars",
    "a dragon who bakes bread",
    "a chess tournament",
    "an old map",
    "a river that flows uphill",
    "a library at night",
    "a clockmaker's apprentice",
    "a storm at sea",
    "a talking cat",
    "a forgotten violin",
    "a mountain village",
    "a time traveller's diary",
    "a garden on the moon",
    "a detective in Venice",
)


def _requests(count: int, max_tokens: int, tag: str) -> list[Any]:
    from collab_agent.backends.base import GREEDY, GenerateRequest

    return [
        GenerateRequest(
            conversation_id=f"bench-batch-{tag}-{i}",
            messages=[
                {"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}
            ],
            stop=(),
            max_tokens=max_tokens,
            sampling=GREEDY,
        )
        for i in range(count)
    ]


async def _throughput(backend: Any, requests: list[Any], concurrency: int) -> tuple[int, float]:
    """(generated tokens, seconds) for ``requests`` at ``concurrency`` through `map_limited`."""
    from collab_agent.backends.base import release_conversation
    from collab_agent.limits import map_limited

    started = time.perf_counter()
    results = await map_limited(backend.generate, requests, max_concurrency=concurrency)
    seconds = time.perf_counter() - started
    for request in requests:
        await release_conversation(backend, request.conversation_id)
    return sum(r.completion_tokens for r in results), seconds


def run_bench(
    models: str = "bundled",
    small: str | None = None,
    concurrency: tuple[int, ...] = (1, 4, 16),
    max_tokens: int = 32,
    requests: int | None = None,
    dtype: str = "auto",
    unbatched: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return the figures (the JSON object of ``--json``)."""
    import anyio
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from collab_agent.backends.batching import BatchedTransformersBackend
    from collab_agent.backends.local import TransformersBackend
    from collab_agent.backends.specs import parse_spec, resolve_pair

    spec = parse_spec(resolve_pair(models, small, None)[0])
    top = max(concurrency)
    if spec.kind == "tiny":
        from collab_agent.backends.tiny import tiny_qwen2

        model, tokenizer = tiny_qwen2(seed=int(spec.target))
        backend = BatchedTransformersBackend(
            model, tokenizer, name=f"tiny-qwen2-{spec.target}", max_batch_size=top
        )
    elif spec.kind in ("bundled", "hf"):
        name = f"bundled:{spec.target}" if spec.kind == "bundled" else spec.target
        loaded = BatchedTransformersBackend.from_pretrained(name, dtype=dtype, max_batch_size=top)
        assert isinstance(loaded, BatchedTransformersBackend)
        backend = loaded
    else:
        from collab_agent.errors import ConfigError

        raise ConfigError("--small", f"bench batch needs a local model spec, got {spec}")
    print(f"bench batch: {backend.name}, {backend.model.dtype}", file=sys.stderr)

    async def main() -> dict[str, Any]:
        await _throughput(backend, _requests(2, 4, "warmup"), 2)
        rates, seconds, tokens = [], [], []
        for c in concurrency:
            count = requests or c
            generated, wall = await _throughput(backend, _requests(count, max_tokens, str(c)), c)
            rates.append(round(generated / wall, 3))
            seconds.append(round(wall, 3))
            tokens.append(generated)
            print(
                f"  concurrency {c:>3}: {generated} tokens in {wall:.1f} s = "
                f"{generated / wall:.1f} tok/s",
                file=sys.stderr,
            )
        figures: dict[str, Any] = {
            "concurrency": list(concurrency),
            "tokens_per_s": rates,
            "seconds": seconds,
            "completion_tokens": tokens,
            "peak_batch_size": backend.peak_batch_size,
        }
        if 1 in concurrency and 16 in concurrency:
            one = rates[concurrency.index(1)]
            figures["speedup_16_vs_1"] = round(rates[concurrency.index(16)] / one, 3)
        if unbatched:
            plain = TransformersBackend(backend.model, backend.tokenizer)
            generated, wall = await _throughput(plain, _requests(1, max_tokens, "plain"), 1)
            figures["unbatched_tokens_per_s"] = round(generated / wall, 3)
        return figures

    figures = anyio.run(main)
    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures.update(
        model=backend.name,
        dtype=str(backend.model.dtype),
        max_tokens=max_tokens,
        threads=torch.get_num_threads(),
    )
    return figures


def register(bench: typer.Typer) -> None:
    """Add ``batch`` to the ``bench`` sub-app."""

    @bench.command("batch")
    def batch(
        models: Annotated[
            str, typer.Option("--models", help="bundled (the 0.5B) or tiny.")
        ] = "bundled",
        small: Annotated[
            str | None, typer.Option("--small", help="Another local model spec to measure.")
        ] = None,
        concurrency: Annotated[
            str, typer.Option("--concurrency", help="Comma-separated concurrency levels.")
        ] = "1,4,16",
        max_tokens: Annotated[
            int, typer.Option("--max-tokens", help="Tokens generated per conversation.")
        ] = 32,
        requests: Annotated[
            int | None,
            typer.Option("--requests", help="Conversations per level (default: the level)."),
        ] = None,
        dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on CPU) or float32.")] = (
            "auto"
        ),
        threads: Annotated[
            int | None,
            typer.Option(
                "--threads",
                help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine).",
            ),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Tokens per second for 1, 4 and 16 concurrent conversations (continuous batching)."""
        from collab_agent.errors import ConfigError

        try:
            levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
        except ValueError as exc:
            raise ConfigError("--concurrency", f"must be integers like 1,4,16: {exc}") from exc
        if not levels or min(levels) <= 0:
            raise ConfigError("--concurrency", f"must be positive integers, got {concurrency!r}")
        if threads is not None and threads <= 0:
            raise ConfigError("--threads", f"must be a positive integer, got {threads}")
        figures = run_bench(models, small, levels, max_tokens, requests, dtype, threads=threads)
        if as_json:
            print(json.dumps(figures))
            return
        for c, rate in zip(figures["concurrency"], figures["tokens_per_s"], strict=True):
            print(f"concurrency {c:>3}: {rate:8.1f} tokens/s")
        if "speedup_16_vs_1" in figures:
            print(f"speedup 16 vs 1: {figures['speedup_16_vs_1']:.2f}x")
        print(f"peak RSS: {figures['peak_rss_bytes'] / 2**30:.2f} GiB")
