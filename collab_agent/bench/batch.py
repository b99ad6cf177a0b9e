"""``collab-agent bench batch``: throughput of concurrent conversations on one local model,
against what the same CPU allows, measured so that a busy machine cannot fool it.

Rows, each at every concurrency ``c`` (default 1, 4, 16):

- ours: ``c`` conversations (or ``--requests``) through `map_limited` with
  ``max_concurrency=c`` (what a chat model's ``abatch`` does) to a `BatchedTransformersBackend`
  (continuous batching; on CPU bf16 alone and float32 from two rows unless ``--dtype``);
- the ceiling: a plain transformers forward loop of the same model at batch ``c`` on the same
  prompt, doing the same work as ours (the prefill, then greedy decode steps until each row has
  ``--max-tokens`` tokens, all timed; no scheduling, no sampling, no text), in bf16 and in
  float32; the best of the two is ``ceiling_tokens_per_s``. The same run's decode steps alone
  (prefill not timed) are ``ceiling_decode_tokens_per_s``, what a long generation tends to;
- llama.cpp: the managed llama.cpp server (`LlamaCppBackend`) on the model's GGUF with ``c``
  ``n_parallel`` slots started for the top level, the same requests (bundled models only).

Every row runs at every level in every round (``--rounds``, default 3), one after the other, so
a load that comes and goes on the machine weighs on all rows alike; figures are the median over
rounds, with min and max for ours.

JSON keys: ``concurrency``, ``tokens_per_s`` (median), ``tokens_per_s_min``,
``tokens_per_s_max``, ``ceiling_tokens_per_s``, ``llamacpp_tokens_per_s`` (``None`` per level
where not measured), ``speedup_16_vs_1``, ``vs_ceiling_16`` (ours over the ceiling at 16);
also ``ceiling_by_dtype``, ``ceiling_decode_tokens_per_s``, ``rounds``, ``peak_batch_size``, ``peak_rss_bytes``, ``model``,
``dtype``, ``max_tokens``, ``threads``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Annotated, Any

import typer

from collab_agent.cli.options import JsonOption

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


async def _throughput(backend: Any, requests: list[Any], concurrency: int) -> float:
    """Generated tokens per second for ``requests`` at ``concurrency`` through `map_limited`."""
    from collab_agent.backends.base import release_conversation
    from collab_agent.limits import map_limited

    started = time.perf_counter()
    results = await map_limited(backend.generate, requests, max_concurrency=concurrency)
    seconds = time.perf_counter() - started
    for request in requests:
        await release_conversation(backend, request.conversation_id)
    return sum(r.completion_tokens for r in results) / seconds


def forward_loop_tokens_per_s(
    model: Any, prompt: list[int], batch: int, steps: int
) -> tuple[float, float]:
    """The plain transformers ceiling, from one run: ``batch`` copies of ``prompt`` prefilled,
    then greedy decode steps of the whole batch until each row has ``steps`` tokens (the first
    comes from the prefill's logits).

    Returns (tokens per second with the prefill timed too, the same work as a generation of
    ``steps`` tokens; tokens per second of the decode steps alone, the prefill's rate when
    ``steps`` is 1).
    """
    import inspect

    import torch
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    arg = "cache" if "cache" in params else "past_key_values"
    with torch.inference_mode():
        cache = {arg: DynamicCache(config=model.config)}
        ids = torch.tensor([prompt] * batch, device=model.device)
        started = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefilled = time.perf_counter()
        for _ in range(steps - 1):
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        ended = time.perf_counter()
    same_work = batch * steps / (ended - started)
    decode = batch * (steps - 1) / (ended - prefilled) if steps > 1 else same_work
    return same_work, decode


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _ceiling_models(backend: Any) -> dict[str, Any]:
    """The model in bf16 and in float32, reusing the backend's copies where they exist."""
    import copy

    import torch

    have = [backend.model, getattr(backend, "_large_model", None)]
    models = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        found = next((m for m in have if m is not None and m.dtype == dtype), None)
        models[name] = found if found is not None else copy.deepcopy(backend.model).to(dtype)
    return models


def _load(spec: Any, dtype: str, top: int) -> Any:
    from collab_agent.backends.batching import BatchedTransformersBackend

    if spec.kind == "tiny":
        from collab_agent.backends.tiny import tiny_qwen2

        model, tokenizer = tiny_qwen2(seed=int(spec.target))
        return BatchedTransformersBackend(
            model, tokenizer, name=f"tiny-qwen2-{spec.target}", max_batch_size=top
        )
    if spec.kind in ("bundled", "hf"):
        name = f"bundled:{spec.target}" if spec.kind == "bundled" else spec.target
        return BatchedTransformersBackend.from_pretrained(name, dtype=dtype, max_batch_size=top)
    from collab_agent.errors import ConfigError

    raise ConfigError("--small", f"bench batch needs a local model spec, got {spec}")


def run_bench(
    models: str = "bundled",
    small: str | None = None,
    concurrency: tuple[int, ...] = (1, 4, 16),
    max_tokens: int = 32,
    requests: int | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    rounds: int = 3,
    llamacpp: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return the figures (the JSON object of ``--json``)."""
    import anyio
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()

    from collab_agent.backends.specs import parse_spec, resolve_pair

    spec = parse_spec(resolve_pair(models, small, None)[0])
    top = max(concurrency)
    backend = _load(spec, dtype, top)
    large = getattr(backend, "_large_model", None)
    dtypes = str(backend.model.dtype) + ("" if large is None else f", {large.dtype} from 2 rows")
    print(f"bench batch: {backend.name}, {dtypes}", file=sys.stderr)
    ceiling_models = _ceiling_models(backend)
    prompt = backend.prompt_ids(_requests(1, max_tokens, "ceiling")[0])

    async def main() -> dict[str, Any]:
        server = None
        if llamacpp and spec.kind == "bundled":
            from collab_agent.backends.llamacpp import LlamaCppBackend

            server = LlamaCppBackend(
                f"bundled:{spec.target}", n_parallel=top, ctx_size=1024, threads=threads
            )
        ours: dict[int, list[float]] = {c: [] for c in concurrency}
        ceiling: dict[str, dict[int, list[float]]] = {
            name: {c: [] for c in concurrency} for name in ceiling_models
        }
        decode: dict[str, dict[int, list[float]]] = {
            name: {c: [] for c in concurrency} for name in ceiling_models
        }
        llama: dict[int, list[float]] = {c: [] for c in concurrency}
        try:
            await _throughput(backend, _requests(2, 4, "warmup"), 2)
            if server is not None:
                await _throughput(server, _requests(2, 4, "warmup"), 2)
            for index in range(rounds):
                for c in concurrency:
                    count = requests or c
                    tag = f"{index}-{c}"
                    rate = await _throughput(backend, _requests(count, max_tokens, tag), c)
                    ours[c].append(rate)
                    line = f"  round {index + 1} c={c:>3}: ours {rate:6.1f}"
                    for name, model in ceiling_models.items():
                        best, decoding = forward_loop_tokens_per_s(model, prompt, c, max_tokens)
                        ceiling[name][c].append(best)
                        decode[name][c].append(decoding)
                        line += f", loop {name} {best:6.1f}"
                    if server is not None:
                        rate = await _throughput(server, _requests(count, max_tokens, tag), c)
                        llama[c].append(rate)
                        line += f", llama.cpp {rate:6.1f}"
                    print(line + " tok/s", file=sys.stderr)
        finally:
            if server is not None:
                await server.aclose()
        by_dtype = {name: [_median(per[c]) for c in concurrency] for name, per in ceiling.items()}
        figures: dict[str, Any] = {
            "concurrency": list(concurrency),
            "tokens_per_s": [_median(ours[c]) for c in concurrency],
            "tokens_per_s_min": [round(min(ours[c]), 3) for c in concurrency],
            "tokens_per_s_max": [round(max(ours[c]), 3) for c in concurrency],
            "ceiling_tokens_per_s": [max(col) for col in zip(*by_dtype.values(), strict=True)],
            "ceiling_by_dtype": by_dtype,
            "ceiling_decode_tokens_per_s": [
                max(_median(per[c]) for per in decode.values()) for c in concurrency
            ],
            "llamacpp_tokens_per_s": [_median(llama[c]) if llama[c] else None for c in concurrency],
            "rounds": rounds,
            "peak_batch_size": backend.peak_batch_size,
        }
        rates, best = figures["tokens_per_s"], figures["ceiling_tokens_per_s"]
        if 1 in concurrency and 16 in concurrency:
            figures["speedup_16_vs_1"] = round(
                rates[concurrency.index(16)] / rates[concurrency.index(1)], 3
            )
        if 16 in concurrency:
            at = concurrency.index(16)
            figures["vs_ceiling_16"] = round(rates[at] / best[at], 3)
        return figures

    figures = anyio.run(main)
    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures.update(model=backend.name, dtype=dtypes, max_tokens=max_tokens, threads=threads)
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
        dtype: Annotated[
            str,
            typer.Option(
                "--dtype", help="auto (on CPU bf16 alone, float32 from 2 rows), bfloat16, float32."
            ),
        ] = "auto",
        rounds: Annotated[
            int, typer.Option("--rounds", help="Rounds over all levels and rows (median).")
        ] = 3,
        llamacpp: Annotated[
            bool,
            typer.Option(
                "--llamacpp/--no-llamacpp", help="Also the llama.cpp server (bundled models)."
            ),
        ] = True,
        threads: Annotated[
            int | None,
            typer.Option(
                "--threads",
                help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine).",
            ),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Tokens per second at 1, 4 and 16 conversations: ours (continuous batching), the plain
        forward-loop ceiling and llama.cpp, interleaved over rounds (median, min, max)."""
        from collab_agent.errors import ConfigError

        try:
            levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
        except ValueError as exc:
            raise ConfigError("--concurrency", f"must be integers like 1,4,16: {exc}") from exc
        if not levels or min(levels) <= 0:
            raise ConfigError("--concurrency", f"must be positive integers, got {concurrency!r}")
        if rounds <= 0:
            raise ConfigError("--rounds", f"must be a positive integer, got {rounds}")
        if threads is not None and threads <= 0:
            raise ConfigError("--threads", f"must be a positive integer, got {threads}")
        figures = run_bench(
            models, small, levels, max_tokens, requests, dtype, threads, rounds, llamacpp
        )
        if as_json:
            print(json.dumps(figures))
            return
        print("concurrency  ours tok/s (min-max)      ceiling  llama.cpp")
        for i, c in enumerate(figures["concurrency"]):
            llama = figures["llamacpp_tokens_per_s"][i]
            print(
                f"{c:>11}  {figures['tokens_per_s'][i]:8.1f} "
                f"({figures['tokens_per_s_min'][i]:.1f}-{figures['tokens_per_s_max'][i]:.1f})"
                f"  {figures['ceiling_tokens_per_s'][i]:8.1f}  "
                + ("-" if llama is None else f"{llama:.1f}")
            )
        for key in ("speedup_16_vs_1", "vs_ceiling_16"):
            if key in figures:
                print(f"{key}: {figures[key]:.2f}x")
        print(f"peak RSS: {figures['peak_rss_bytes'] / 2**30:.2f} GiB")
