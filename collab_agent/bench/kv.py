"""`collab-agent bench kv`: SmallKV against H2O, SnapKV and StreamingLLM at equal KV budgets.

Protocol: each context is a chat prompt of exactly ``--context-tokens`` tokens
(MATH-500 problems with their worked solutions as few-shot examples, then a new problem). The
full-cache LRM writes its greedy continuation (``--tokens``) one token at a time; every method
then reads the same prompt and is teacher-forced along that continuation one token at a time
(the same decode mode). Reported per method and budget: ``top1_agreement`` with the full-cache
LRM, mean ``kl`` (nats, full || method) of the next-token distributions, ``kv_bytes_ratio``
(device KV bytes relative to the full cache after the last step) and ``decode_speed_ratio``
(decode step time of the full cache over the method's, same batch, same run).

To fit a CPU, the prompt is prefilled once with a probe that records every method's statistics
and the cache is cloned per method; the contexts and budgets of one method run as the rows of
one batch.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.cli_options import JsonOption

if TYPE_CHECKING:
    import torch

DATA_NAME = "math500.jsonl"
"""The contexts' file in the data folder (`collab_agent.evaluation.datasets.data_dir`)."""
SMALLKV_SETTINGS: dict[str, tuple[bool, dict[str, Any]]] = {
    "smallkv_paper": (True, {}),
    "smallkv_paper_prompt": (True, {"budget_of": "prompt"}),
    "smallkv_paper_window": (True, {"score": "window"}),
    "smallkv_no_prior": (False, {"prior": 0.0}),
    "smallkv_marginal": (False, {"split": (2, 0, 2)}),
    "smallkv_recent": (False, {"split": (1, 1, 0)}),
    "smallkv_accumulated": (False, {"score": "accumulated"}),
    "smallkv_recent_no_prior": (False, {"split": (1, 1, 0), "prior": 0.0}),
    "smallkv_every_8": (False, {"refresh_every": 8}),
    "smallkv_recent_every_8": (False, {"split": (1, 1, 0), "refresh_every": 8}),
}
"""SmallKV variants by name: (start from `SmallKV.PAPER`?, keyword arguments on top)."""
VARIANTS = tuple(SMALLKV_SETTINGS)
"""Extra rows on request: SmallKV as the paper configures it (`SmallKV.PAPER`: 2:1:2 split of
the whole context, the SRM's accumulated attention only, plain-sum marginal output), that with
this benchmark's prompt accounting or with the windowed score, and the default without the large
model's prior, with half the allowance as V-only marginal tokens, or with half of it the most
recent tokens (H2O's split; with and without the prior), ranking by the SRM's attention
accumulated over every query instead of a window, and choosing every 8 tokens
(`KVMethod.refresh_every`)."""


MethodsOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated methods (default: every one of collab_agent.cache.METHODS but full)."
    ),
]
"""The ``--methods`` option of `bench kv` and `bench kv-gsm8k` (`parse_methods` reads it)."""


def method_names() -> tuple[str, ...]:
    """The methods `bench kv` runs by default: every one of `collab_agent.cache.METHODS` but
    the full cache, the reference they are measured against."""
    from collab_agent.cache import METHODS

    return tuple(name for name in METHODS if name != "full")


def __getattr__(name: str) -> Any:
    if name == "METHOD_NAMES":  # read from the registry on use: importing it loads torch
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fit_prompt(
    tokenizer: Any,
    system: str,
    user: str,
    shots: Iterator[str],
    length: int,
    option: str = "--context-tokens",
) -> list[int]:
    """The chat prompt (system, user) of exactly ``length`` tokens: ``user``'s ``{shots}`` is
    filled with as many of ``shots`` as fit, the first ones cut at the front. Equal lengths let
    prompts run as rows of one batch."""
    from collab_agent.errors import ConfigError

    marker = "<<SHOTS>>"
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user.replace("{shots}", marker, 1)},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head, tail = text.split(marker)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    room = length - len(head_ids) - len(tail_ids)
    if room < 64:
        raise ConfigError(
            option, f"{length} leaves no room for examples; use at least {length - room + 64}"
        )
    ids: list[int] = []
    while len(ids) < room:
        ids += tokenizer(next(shots), add_special_tokens=False)["input_ids"]
    return head_ids + ids[len(ids) - room :] + tail_ids


def build_contexts(tokenizer: Any, count: int, length: int, data: Path) -> list[list[int]]:
    """``count`` chat prompts of exactly ``length`` tokens: a few-shot block of MATH-500 problems
    with their worked solutions (cut at the front to fit), then a new problem to solve."""
    problems = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line]
    problems = [p for p in problems if "[asy]" not in p["solution"]]
    contexts: list[list[int]] = []
    for index in range(count):
        question = problems[(index * 37 + 250) % len(problems)]["question"]
        shots = (
            f"Problem: {p['question']}\nSolution: {p['solution']}\n\n"
            for p in itertools.islice(itertools.cycle(problems), index * 37, None)
        )
        user = (
            "Here are worked examples.\n\n{shots}\n\n"
            f"Now solve this problem step by step.\nProblem: {question}"
        )
        contexts.append(
            fit_prompt(tokenizer, "You are a careful mathematician.", user, shots, length)
        )
    return contexts


def kl_and_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || got) in nats and top-1 agreement over the steps of ``(T, V)`` logits."""
    import torch

    lp_ref = torch.log_softmax(ref.float(), -1)
    lp_got = torch.log_softmax(got.float(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return kl, agree


def parse_methods(methods: str) -> tuple[str, ...]:
    """The comma-separated ``--methods`` as names, each checked against the known methods."""
    from collab_agent.errors import ConfigError

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    known = method_names() + VARIANTS
    unknown = set(names) - set(known)
    if unknown:
        raise ConfigError("--methods", f"unknown {sorted(unknown)}; choose from {known}")
    return names


def make_method(name: str, small: Any, budget_of: str | None = None, **options: Any) -> Any:
    """The method ``name`` (of `collab_agent.cache.METHODS` or `VARIANTS`) with its defaults
    and ``options`` (``budget``); a method with an ``assistant`` field gets the small model.
    ``budget_of`` (``"context"`` or ``"prompt"``) sets every method's accounting, a variant's
    own excepted."""
    from collab_agent.cache import SmallKV
    from collab_agent.cache.named import make_method as named_method

    if budget_of is not None:
        options["budget_of"] = budget_of
    if name in SMALLKV_SETTINGS:
        paper, extra = SMALLKV_SETTINGS[name]
        settings = {**(SmallKV.PAPER if paper else {}), **options, **extra}
        return SmallKV(assistant=small, **settings)
    return named_method(name, assistant=small, **options)


def statistics_probe(small: Any) -> Any:
    """A method that never compresses but records, in one prefill, what every method needs:
    H2O's accumulated attention, SnapKV's window votes, SmallKV's calibration block, the query
    statistics of expected attention (ExpectedAttention, SmallKV's prior). The prompt
    is then prefilled once and the cache cloned per method (`CompressedCache.clone`)."""
    from collab_agent.cache import H2O, SmallKV, SnapKV
    from collab_agent.cache.base import accumulate_scores
    from collab_agent.cache.expected import observe_queries
    from collab_agent.cache.smallkv import PRIOR_SINKS

    snap, smallkv = SnapKV(), SmallKV(assistant=small)

    class StatisticsProbe(H2O):
        def ready(self, cache: Any, layer: Any) -> bool:
            return False

        def observe(self, cache: Any, layer: Any, probs: Any, q_pos: Any, k_pos: Any) -> None:
            accumulate_scores(layer, probs, k_pos)
            window = q_pos >= layer.length - snap.window
            if bool(window.any()):
                snap.observe(cache, layer, probs[:, :, :, window], q_pos[window], k_pos)
            calib = q_pos >= layer.length - smallkv.calibration_tokens  # the last queries
            if bool(calib.any()):
                smallkv.observe(cache, layer, probs[:, :, :, calib], q_pos[calib], k_pos)

        def observe_queries(
            self, cache: Any, layer: Any, module: Any, query: Any, q_pos: Any
        ) -> None:
            observe_queries(layer, module, query, q_pos, PRIOR_SINKS)

    return StatisticsProbe(budget=1.0)


PEER_SCRIPT = Path(__file__).with_name("kvpress_peer.py")
PEER_PRESSES = ("snapkv", "streaming", "expected_attention", "observed_attention")


def peer_kvpress(
    python: str,
    large: Any,
    contexts: list[list[int]],
    continuations: list[list[int]],
    budgets: list[float],
    presses: tuple[str, ...] = PEER_PRESSES,
    timeout: float = 7200.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """kvpress's presses on the same contexts and continuations, run by ``python`` (an
    interpreter with kvpress installed) on `kvpress_peer.py`; returns its JSON answer.

    The large model is read from its own folder when it was loaded from one, else saved to a
    temporary folder first.
    """
    from collab_agent.errors import BackendError, ConfigError

    with tempfile.TemporaryDirectory(prefix="collab-kvpress-") as tmp:
        source = str(getattr(large.config, "_name_or_path", "") or "")
        folder = Path(source)
        if not source or not (folder / "config.json").is_file():
            folder = Path(tmp) / "model"
            large.save_pretrained(folder)
        request = {
            "model": str(folder),
            "contexts": contexts,
            "continuations": continuations,
            "budgets": budgets,
            "presses": list(presses),
            **(extra or {}),
        }
        log(f"[kv] kvpress peer rows: {python} {PEER_SCRIPT.name}")
        try:
            done = subprocess.run(
                [python, str(PEER_SCRIPT)],
                input=json.dumps(request),
                stdout=subprocess.PIPE,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise ConfigError("--peer-kvpress", f"no interpreter at {python!r}") from exc
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"kvpress peer run passed its {timeout:.0f} s limit") from exc
    if done.returncode != 0:
        raise BackendError(
            f"kvpress peer run exited with {done.returncode} (its messages are above); "
            f"does {python!r} have kvpress installed (`make install-kvpress`)?"
        )
    return json.loads(done.stdout)


class SharedPrefill:
    """The prompt prefilled once by `statistics_probe`; `cache_for` clones it per method (the
    SRM reads the prompt once for every SmallKV variant)."""

    def __init__(self, small: Any, large: Any, ids: torch.Tensor) -> None:
        from collab_agent.cache import prefill

        self.ids = ids
        self.base, self.last, self.seconds = prefill(large, ids, statistics_probe(small))
        self._srm_read: Any = None

    def cache_for(self, method: Any) -> Any:
        """A cache of ``method`` (attached) holding the prompt, ready to decode."""
        from collab_agent.cache import SmallKV

        if not isinstance(method, SmallKV):
            return self.base.clone(method=method)
        if self._srm_read is None:
            self._srm_read = self.base.clone(method=method)
            method.observe_tokens(self._srm_read, self.ids)
            return self._srm_read
        return self._srm_read.clone(method=method)


def run_kv_bench(
    small: Any,
    large: Any,
    contexts: list[list[int]],
    tokens: int,
    budgets: list[float],
    methods: tuple[str, ...] | None = None,
    peer_python: str | None = None,
    budget_of: str | None = None,
) -> dict[str, Any]:
    """The benchmark itself, on loaded models; returns the JSON object `bench kv` prints.

    All contexts (equal lengths) and budgets run as the rows of one batch: row
    ``c * len(budgets) + i`` is context ``c`` at budget ``budgets[i]``. With ``peer_python``
    kvpress's presses add their rows (``kvpress_<press>``) on the same contexts and the same
    teacher-forced continuation (`peer_kvpress`). ``budget_of="context"``: every method keeps
    that share of the whole current context, the decoded tokens included (the collaboration's
    accounting); by default the prompt is compressed and decoded tokens are kept.
    """
    import torch

    from collab_agent.cache import Full, decode

    device = next(large.parameters()).device
    n_ctx, n_b = len(contexts), len(budgets)
    ids = torch.tensor(contexts, device=device)
    log(f"[kv] {n_ctx} contexts of {ids.shape[1]} tokens: one prefill (all statistics)")
    shared = SharedPrefill(small, large, ids)
    base, last, seconds = shared.base, shared.last, shared.seconds
    log(f"[kv]   prefill {seconds:.0f} s; full-cache greedy continuation of {tokens} tokens")
    greedy = decode(large, base.clone(method=Full()), last, tokens)
    peer = None
    if peer_python is not None:  # now, while this process holds little beyond the models
        peer = peer_kvpress(peer_python, large, contexts, greedy.tokens.tolist(), budgets)
    forced = greedy.tokens.repeat_interleave(n_b, 0)
    last_rows = last.repeat_interleave(n_b, 0)
    row_budgets = budgets * n_ctx
    # the reference: the full cache's own one-token-at-a-time decode (the same mode as the
    # methods' teacher forcing); its speed at the methods' batch size over a few steps
    reference = greedy.logits.repeat_interleave(n_b, 0)
    timing_steps = min(tokens, 17)
    full_timing = decode(
        large,
        base.clone(method=Full(), batch_repeat=n_b),
        last_rows,
        timing_steps,
        forced=forced,
    )
    full_step = full_timing.decode_seconds / (timing_steps - 1)
    log(f"[kv]   full: {1 / full_step:.2f} steps/s at batch {n_ctx * n_b}")
    floor = [
        kl_and_agreement(greedy.logits[c, :timing_steps], full_timing.logits[c * n_b])[1]
        for c in range(n_ctx)
    ]
    result: dict[str, Any] = {"methods": {}}
    for name in methods or method_names():
        method = make_method(name, small, budget_of).attach(large)
        start = time.perf_counter()
        cache = shared.cache_for(method)
        out = decode(
            large,
            cache.clone(budgets=row_budgets, batch_repeat=n_b),
            last_rows,
            tokens,
            forced=forced,
        )
        cells: dict[str, Any] = {}
        for i, budget in enumerate(budgets):
            rows = [c * n_b + i for c in range(n_ctx)]
            figures = [kl_and_agreement(reference[r], out.logits[r]) for r in rows]
            cells[str(budget)] = {
                "top1_agreement": round(sum(f[1] for f in figures) / n_ctx, 4),
                "kl": round(sum(f[0] for f in figures) / n_ctx, 4),
                "kv_bytes_ratio": round(sum(_row_ratio(out.cache, r) for r in rows) / n_ctx, 4),
                "decode_speed_ratio": round(full_step * (tokens - 1) / out.decode_seconds, 4),
            }
            log(f"[kv]   {name} @ {budget}: {cells[str(budget)]}")
        result["methods"][name] = cells
        if hasattr(method, "detach"):
            method.detach()
        log(f"[kv]   {name}: {time.perf_counter() - start:.0f} s")
    if peer is not None:
        result["methods"].update(peer["methods"])
        result["peer"] = peer["peer"]
    result["full_numerics_floor"] = {
        "top1_agreement": round(sum(floor) / n_ctx, 4),
        "note": "full cache, batched teacher-forced vs its own greedy decode (first steps)",
    }
    result["contexts"] = n_ctx
    result["context_tokens"] = ids.shape[1]
    result["tokens"] = tokens
    result["budget_accounting"] = (
        "share of the whole context, decoded tokens included"
        if budget_of == "context"
        else "prompt compressed to budget; decoded tokens add to the allowance"
    )
    return result


def _row_ratio(cache: Any, row: int) -> float:
    """Final device KV bytes of batch row ``row`` relative to the full cache."""
    kept = full = 0.0
    for layer in cache.layers:
        if layer.keys is None:
            continue
        _, h, _, d = layer.keys.shape
        full += 2 * h * layer.length * d
        if not layer.compressed:
            kept += 2 * h * layer.length * d
            continue
        kept += 2 * d * int((layer.positions[row] >= 0).sum())
        if layer.marginal_positions is not None:
            kept += d * int((layer.marginal_positions[row] >= 0).sum())
    return kept / full if full else 1.0


def load_models(models: str) -> tuple[Any, Any, Any]:
    """(small, large, tokenizer) for ``bundled`` (the Qwen 0.5B/1.5B pair, bf16) or ``tiny``."""
    if models == "tiny":
        from collab_agent.backends.tiny import tiny_pair

        pair = tiny_pair()
        return pair.small, pair.large, pair.tokenizer
    if models != "bundled":
        from collab_agent.errors import ConfigError

        raise ConfigError("--models", f"must be 'bundled' or 'tiny', got {models!r}")
    from collab_agent.backends import bundled

    tokenizer = bundled.load_tokenizer()
    small = bundled.load_model(bundled.DEFAULT_SMALL)
    large = bundled.load_model(bundled.DEFAULT_LARGE)
    return small, large, tokenizer


def register(bench: typer.Typer) -> None:
    """Add ``kv`` to the ``bench`` sub-app."""

    @bench.command("kv")
    def kv(
        models: Annotated[
            str, typer.Option(help="bundled (Qwen 0.5B assists 1.5B) or tiny.")
        ] = "bundled",
        budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets.")] = "0.2,0.1,0.05",
        contexts: Annotated[int, typer.Option(help="Number of contexts.")] = 2,
        context_tokens: Annotated[
            int, typer.Option(help="Minimum prompt length in tokens.")
        ] = 1500,
        tokens: Annotated[int, typer.Option(help="Teacher-forced tokens per context.")] = 256,
        methods: MethodsOption = None,
        data: Annotated[
            Path | None,
            typer.Option(help="MATH-500 JSONL for the contexts (default: the data folder's)."),
        ] = None,
        peer_kvpress: Annotated[
            str | None,
            typer.Option(
                help="Python interpreter with kvpress installed (`make install-kvpress` builds "
                ".venv-kvpress/bin/python): adds kvpress's presses as rows on the same contexts."
            ),
        ] = None,
        budget_of: Annotated[
            str,
            typer.Option(
                help="prompt: the prompt is compressed, decoded tokens kept (kvpress's); "
                "context: a share of the whole context, decoded tokens too (a reasoning "
                "trace's, as TransformersBackend keeps it)."
            ),
        ] = "prompt",
        as_json: JsonOption = False,
    ) -> None:
        """KV compression at equal budgets: agreement and KL with the full cache, bytes, speed."""
        import torch

        from collab_agent.errors import ConfigError
        from collab_agent.evaluation.datasets import data_dir

        try:
            budget_list = [float(b) for b in budgets.split(",") if b.strip()]
        except ValueError as exc:
            raise ConfigError(
                "--budgets", f"must be numbers like 0.2,0.1, got {budgets!r}"
            ) from exc
        if not budget_list or not all(0 < b <= 1 for b in budget_list):
            raise ConfigError("--budgets", f"each must lie in (0, 1], got {budgets!r}")
        method_list = parse_methods(methods) if methods else method_names()
        if budget_of not in ("prompt", "context"):
            raise ConfigError("--budget-of", f"must be prompt or context, got {budget_of!r}")
        if contexts < 1 or tokens < 2:
            raise ConfigError("--contexts/--tokens", "need at least 1 context and 2 tokens")
        torch.manual_seed(0)
        with torch.inference_mode():
            small, large, tokenizer = load_models(models)
            ctx = build_contexts(
                tokenizer, contexts, context_tokens, data or data_dir() / DATA_NAME
            )
            result = run_kv_bench(
                small,
                large,
                ctx,
                tokens,
                budget_list,
                method_list,
                peer_python=peer_kvpress,
                budget_of=budget_of,
            )
        result["models"] = models
        if as_json:
            print(json.dumps(result))
            return
        header = f"{'method':<28} {'budget':>6} {'top1':>7} {'KL':>8} {'bytes':>7} {'speed':>7}"
        print(header)
        for name, cells in result["methods"].items():
            for b, c in cells.items():
                speed = c["decode_speed_ratio"]
                print(
                    f"{name:<28} {b:>6} {c['top1_agreement']:>7.3f} {c['kl']:>8.4f} "
                    f"{c['kv_bytes_ratio']:>7.3f} {'-' if speed is None else f'{speed:.3f}':>7}"
                )
