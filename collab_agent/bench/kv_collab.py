"""`collab-agent bench kv-collab`: SmallKV in the setting it exists for, TrigReason with a local LRM.

TrigReason (priming 1 step) runs the same GSM8K problems once with the large model's full cache
and once with each KV method (SmallKV, H2O, SnapKV, StreamingLLM) at ``--budget`` of the whole
current context (the collaboration's accounting: prompt and reasoning). Greedy decoding, so the
full-cache run is the reference every method's answers are compared with. Reported per method:

- ``accuracy`` and ``same_answer_as_full`` (problems whose extracted answer equals the full
  cache's);
- ``kv_bytes_vs_full``: the LRM's peak device KV bytes over the problem, summed over problems,
  over what a full cache holds for the same tokens at that point;
- ``decode_s_per_token_vs_full``: the LRM's wall time per one-token forward (the SRM pass that
  SmallKV's hook runs included) over the full cache's, same process;
- ``srm_forward_tokens_vs_plain``: tokens the SRM ran forward on (its own steps and any pass a
  KV method adds) over the full-cache run's;
- ``srm_tokens_per_trace_token_vs_plain``: the same per token of the problems' traces (question,
  steps written or rejected, answer), over the full-cache run's. Each method's answers take
  their own path, so the plain count moves with the traces' lengths; per trace token, a second
  SRM pass over the text the LRM reads shows as a ratio well above 1;
- ``rollbacks``: LRM calls whose prompt left the cached tokens (the cache was cropped or reset);
- ``errors``: problems that raised.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.cli_options import JsonOption

if TYPE_CHECKING:
    from collab_agent.evaluation.datasets import Problem

VARIANTS = ("smallkv_paper", "smallkv_recent", "smallkv_accumulated", "smallkv_every_8")
"""Extra rows on request, `bench kv`'s variants of those names: `SmallKV.PAPER`; the defaults
with half the allowance recent; the defaults ranking by the SRM's attention accumulated over
every query instead of a window; the defaults choosing every 8 tokens (the SRM reading the
large model's tokens in blocks)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_cache(name: str, small: Any, budget: float) -> Any:
    """The KV method ``name`` at ``budget`` of the whole context (``None`` for the full cache)."""
    from collab_agent.bench.kv import make_method

    if name == "full":
        return None
    return make_method(name, small, "context", budget=budget)


class Meter:
    """Counts on the two models: SRM forward tokens, LRM one-token forward seconds (nothing
    while ``paused``: another method's problem is running)."""

    def __init__(self, small_model: Any, large_model: Any) -> None:
        self.paused = False
        self.srm_tokens = 0
        self.decode_s = 0.0
        self.decode_steps = 0
        self._started = 0.0
        base = getattr(small_model, "base_model", small_model)
        self._handles = [
            base.register_forward_pre_hook(self._count_srm, with_kwargs=True),
            large_model.register_forward_pre_hook(self._start, with_kwargs=True, prepend=True),
            large_model.register_forward_hook(self._stop, with_kwargs=True),
        ]

    @staticmethod
    def _ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return kwargs.get("input_ids", args[0] if args else None)

    def _count_srm(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = self._ids(args, kwargs)
        if ids is not None and not self.paused:
            self.srm_tokens += int(ids.shape[-1])

    def _start(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = self._ids(args, kwargs)
        one_token = ids is not None and ids.shape[-1] == 1
        self._started = time.perf_counter() if one_token and not self.paused else 0.0

    def _stop(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if self._started:
            self.decode_s += time.perf_counter() - self._started
            self.decode_steps += 1
            self._started = 0.0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class MethodRun:
    """TrigReason with the LRM's cache of method ``name``: one problem at a time, raw figures."""

    def __init__(
        self,
        name: str,
        small: Any,
        large_model: Any,
        tokenizer: Any,
        budget: float,
        reasoner_options: dict[str, Any],
    ) -> None:
        from collab_agent.backends.local import TransformersBackend
        from collab_agent.core.reasoner import Reasoner
        from collab_agent.policies import TrigReason

        self.name = name
        self.method = make_cache(name, small, budget)
        self.large = TransformersBackend(
            large_model, tokenizer, name=f"large-{name}", kv_method=self.method
        )
        self.meter = Meter(small.model, large_model)
        self.held: dict[str, list[int]] = {}
        self.peaks: dict[str, tuple[int, int]] = {}
        self.rollbacks = 0
        self.large.on_generation = self._observe
        self.reasoner = Reasoner(small, self.large, TrigReason(priming_steps=1), **reasoner_options)
        # each method hooks the large model only while its problem runs, so the others' hooks
        # (SmallKV's pre-hook, the meter's timers) never fire on its calls
        self._pause()

    def _observe(self, request: Any, prompt: list[int], sampled: list[int]) -> None:
        from collab_agent.backends.local import common_prefix_length

        cid = request.conversation_id
        before = self.held.get(cid, [])
        if common_prefix_length(before, prompt) < len(before):
            self.rollbacks += 1
        self.held[cid] = prompt + sampled[:-1]
        entry = self.large._store._entries.get(cid)
        if entry is not None:
            kv = entry.kv
            device = kv.device_bytes() if hasattr(kv, "device_bytes") else entry.nbytes
            full = kv.full_bytes() if hasattr(kv, "full_bytes") else entry.nbytes
            old = self.peaks.get(cid, (0, 0))
            if device > old[0]:
                self.peaks[cid] = (device, max(full, old[1]))

    def _pause(self) -> None:
        self.meter.paused = True
        if self.method is not None and hasattr(self.method, "detach"):
            self.method.detach()

    def _resume(self, large_model: Any) -> None:
        self.meter.paused = False
        if self.method is not None and hasattr(self.method, "attach"):
            self.method.attach(large_model)

    async def solve(self, problem: Problem, large_model: Any) -> dict[str, Any]:
        """One problem's raw figures; a crash is counted and logged, not raised (it is a
        figure here)."""
        from collab_agent.evaluation.grading import extract_answer, is_correct

        started = time.perf_counter()
        meter = self.meter
        before = (meter.decode_s, meter.decode_steps, meter.srm_tokens, self.rollbacks)
        cid = f"{self.name}-{problem.id}"
        error = None
        tokens = 0
        self._resume(large_model)
        try:
            trace = await self.reasoner.run(
                [{"role": "user", "content": problem.question}], conversation_id=cid
            )
            answer = extract_answer(trace.answer)
            tokens = trace_tokens(self.large.tokenizer, problem.question, trace)
        except Exception as exc:
            answer = None
            error = f"{type(exc).__name__}: {exc}"
            log(f"[kv-collab] {self.name} {problem.id}: {error}")
        finally:
            self._pause()
        ok = answer is not None and is_correct(answer, problem.answer)
        seconds = time.perf_counter() - started
        log(
            f"[kv-collab] {self.name} {problem.id}: {'right' if ok else 'wrong'} "
            f"({answer!r} vs {problem.answer}), {seconds:.0f} s"
        )
        device, full = self.peaks.get(cid, (0, 0))
        return {
            "answer": answer,
            "correct": ok,
            "device_bytes": device,
            "full_bytes": full,
            "decode_s": meter.decode_s - before[0],
            "decode_steps": meter.decode_steps - before[1],
            "srm_forward_tokens": meter.srm_tokens - before[2],
            "trace_tokens": tokens,
            "rollbacks": self.rollbacks - before[3],
            "error": error,
            "seconds": round(seconds, 1),
        }

    def close(self) -> None:
        self.meter.close()
        self._pause()


RECORDS = "records.jsonl"
"""One JSON line per finished problem in ``--out``: its id and every method's raw figures
(``config.json`` beside it holds the settings; a resume under others is refused)."""


def read_records(out: Path | None, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The problems ``out`` has finished under ``config``, by id (none without ``out``);
    writes ``config`` there, or refuses a folder holding runs of other settings."""
    from collab_agent.evaluation.records import CONFIG_FILE, check_settings, json_lines

    if out is None:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, config, "--out", "choose another folder")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {record["problem"]: record["methods"] for record in json_lines(out / RECORDS)}


async def run_kv_collab(
    small: Any,
    large_model: Any,
    tokenizer: Any,
    problems: list[Problem],
    budget: float,
    methods: tuple[str, ...],
    reasoner_options: dict[str, Any],
    out: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The benchmark on loaded models; returns the JSON object `bench kv-collab` prints.

    Every problem runs under every method before the next problem starts, so a change in the
    machine's load falls on all methods alike (the decode-time ratios are then fair), and a run
    stopped early still compares the methods on the same problems. With ``out``, each finished
    problem is appended there and a later run with the same settings (these and ``settings``,
    e.g. the models' names) skips it (resumable)."""
    from collab_agent.evaluation.records import append_json_line

    names = ("full", *[m for m in methods if m != "full"])
    config = {**(settings or {}), "kv_budget": budget, "methods": list(names), **reasoner_options}
    config["sampling"] = str(config.get("sampling"))
    done = read_records(out, config)
    todo = [p for p in problems if p.id not in done]
    if done:
        log(f"[kv-collab] {len(problems) - len(todo)} problems already in {out}")
    if todo:
        runs = [
            MethodRun(n, small, large_model, tokenizer, budget, reasoner_options) for n in names
        ]
        try:
            for problem in todo:
                done[problem.id] = {
                    n: await r.solve(problem, large_model) for n, r in zip(names, runs, strict=True)
                }
                if out is not None:
                    record = {"problem": problem.id, "methods": done[problem.id]}
                    append_json_line(out / RECORDS, record)
                so_far = summarise([done[p.id] for p in problems if p.id in done], names)
                log(f"[kv-collab] after {problem.id}: {json.dumps(so_far['methods'])}")
        finally:
            for run in runs:
                run.close()
    return {"budget": budget, **summarise([done[p.id] for p in problems], names)}


def summarise(records: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """The figures of `bench kv-collab` over per-problem ``records`` (``{method: raw}``)."""
    from collab_agent.evaluation.grading import is_correct

    def total(name: str, key: str) -> float:
        return sum(r[name][key] for r in records)

    def ratio(a: float, b: float, digits: int) -> float | None:
        return round(a / b, digits) if b else None

    def per(name: str, key: str, by: str) -> float:
        count = total(name, by)
        return total(name, key) / count if count else 0.0

    result: dict[str, Any] = {"problems": len(records), "methods": {}}
    for name in names:
        same = sum(
            r[name]["answer"] is not None
            and r["full"]["answer"] is not None
            and is_correct(r[name]["answer"], r["full"]["answer"])
            for r in records
        )
        kv = ratio(total(name, "device_bytes"), total(name, "full_bytes"), 6) or 1.0
        full_kv = ratio(total("full", "device_bytes"), total("full", "full_bytes"), 6) or 1.0
        result["methods"][name] = {
            "accuracy": round(total(name, "correct") / len(records), 4) if records else 0.0,
            "same_answer_as_full": same,
            "kv_bytes_vs_full": round(kv / full_kv, 4),
            "decode_s_per_token_vs_full": ratio(
                per(name, "decode_s", "decode_steps"), per("full", "decode_s", "decode_steps"), 3
            ),
            "srm_forward_tokens_vs_plain": ratio(
                total(name, "srm_forward_tokens"), total("full", "srm_forward_tokens"), 3
            ),
            "srm_tokens_per_trace_token_vs_plain": ratio(
                per(name, "srm_forward_tokens", "trace_tokens"),
                per("full", "srm_forward_tokens", "trace_tokens"),
                3,
            ),
            "rollbacks": int(total(name, "rollbacks")),
            "errors": sum(r[name]["error"] is not None for r in records),
        }
    return result


def trace_tokens(tokenizer: Any, question: str, trace: Any) -> int:
    """Tokens of one problem's trace: the question, every step written or rejected, the answer."""
    steps = sum(step.tokens + step.rejected_tokens for step in trace.steps)
    return len(tokenizer.encode(question)) + steps + len(tokenizer.encode(trace.answer))


def load_gsm8k(data: str | None, count: int, first: int) -> list[Problem]:
    """``count`` problems from ``first`` on, read by the eval's loader: a JSON Lines file of the
    eval's format or a bundled data set's name, by default GSM8K from the shared data folder."""
    from collab_agent.errors import ConfigError
    from collab_agent.evaluation.datasets import load_dataset

    name = data or "gsm8k_test"
    problems = load_dataset(name, limit=count, offset=first)
    if len(problems) < count:
        raise ConfigError("--problems", f"{name} has fewer than {first + count} problems")
    return problems


def register(bench: typer.Typer) -> None:
    """Add ``kv-collab`` to the ``bench`` sub-app."""

    @bench.command("kv-collab")
    def kv_collab(
        models: Annotated[
            str, typer.Option(help="bundled (Qwen 0.5B SRM, local 1.5B LRM) or tiny.")
        ] = "bundled",
        problems: Annotated[int, typer.Option(help="GSM8K problems.")] = 20,
        first: Annotated[int, typer.Option(help="Index of the first problem.")] = 0,
        budget: Annotated[
            float, typer.Option(help="KV budget: share of the whole context.")
        ] = 0.25,
        methods: Annotated[
            str | None,
            typer.Option(
                help="Comma-separated methods besides the full cache (default: every one of "
                "collab_agent.cache.METHODS)."
            ),
        ] = None,
        reasoning_tokens: Annotated[int, typer.Option(help="Most reasoning tokens.")] = 512,
        step_tokens: Annotated[int, typer.Option(help="Most tokens per step.")] = 128,
        data: Annotated[
            str | None, typer.Option(help="JSON Lines problems (question, answer).")
        ] = None,
        threads: Annotated[
            int | None, typer.Option(help="torch CPU threads (default: torch's own choice).")
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option(
                help="Folder for per-problem records: a later run with the same settings skips "
                "the problems it holds (resumable; each run adds problems)."
            ),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """TrigReason with the large model's cache full and compressed by each KV method."""
        import anyio
        import torch

        from collab_agent.backends.base import GREEDY
        from collab_agent.backends.specs import load_backend, resolve_pair
        from collab_agent.cache import METHODS
        from collab_agent.errors import ConfigError

        if not 0 < budget <= 1:
            raise ConfigError("--budget", f"must lie in (0, 1], got {budget}")
        if threads is not None and threads < 1:
            raise ConfigError("--threads", f"must be >= 1, got {threads}")
        if problems < 1 or first < 0:
            raise ConfigError("--problems/--first", "need at least 1 problem from index >= 0")
        known = (*METHODS, *VARIANTS)
        names = tuple(m.strip() for m in (methods or ",".join(METHODS)).split(",") if m.strip())
        if set(names) - set(known):
            raise ConfigError("--methods", f"unknown {sorted(set(names) - set(known))}; {known}")
        rows = load_gsm8k(data, problems, first)
        small_spec, large_spec = resolve_pair(models, None, None)
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        small = load_backend(small_spec)
        large = load_backend(large_spec)
        options = {
            "sampling": GREEDY,
            "budget": reasoning_tokens,
            "step_max_tokens": step_tokens,
            "answer_max_tokens": 32,
        }
        large_model, tokenizer = large.model, large.tokenizer  # type: ignore[attr-defined]
        result = anyio.run(
            run_kv_collab,
            small,
            large_model,
            tokenizer,
            rows,
            budget,
            names,
            options,
            out,
            {"models": models},
        )
        result.update(models=models, first=first, budget_of="context", policy="trigreason(1)")
        if as_json:
            print(json.dumps(result))
            return
        keys = (
            "accuracy",
            "same_answer_as_full",
            "kv_bytes_vs_full",
            "decode_s_per_token_vs_full",
            "srm_forward_tokens_vs_plain",
            "srm_tokens_per_trace_token_vs_plain",
            "rollbacks",
            "errors",
        )
        print(f"{'method':<10} " + " ".join(f"{k:>12.12}" for k in keys))
        for name, cell in result["methods"].items():
            print(f"{name:<10} " + " ".join(f"{cell[k]!s:>12.12}" for k in keys))
