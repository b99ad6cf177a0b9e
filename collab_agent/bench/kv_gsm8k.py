"""`collab-agent bench kv-gsm8k`: the large model's GSM8K answers with each KV cache at one budget.

The accuracy check: each problem is a chat prompt of exactly ``--prompt-tokens`` tokens
(worked GSM8K solutions from other problems as few-shot examples, cut at the front to fit, then
the problem), so the budget has a long prompt to compress and the prompts run as rows of one
batch. The large model answers greedily with the full cache and with every method's cache at
``--budget`` (prompt compressed to the budget, decoded tokens all kept, as in `bench kv`).
Reported per method: accuracy, how many answers equal the full cache's, and (in the JSON) every
answer and its text.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Annotated, Any

import typer

from collab_agent.bench.kv import SharedPrefill, fit_prompt, load_models, log, make_method
from collab_agent.cli_options import JsonOption

SYSTEM = "Solve the problem step by step. End with: The answer is N."
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
STOPS = (*END_OF_TURN, "\nQuestion:")


def worked_example(problem: Any) -> str:
    """A GSM8K record as a few-shot example: calculator annotations dropped, ``#### N`` written
    as the sentence the system prompt asks for."""
    solution = re.sub(r"<<[^>]*>>", "", problem.extra["solution"])
    solution = re.sub(r"\n?####\s*(.+)\s*$", r"\nThe answer is \1.", solution.strip())
    return f"Question: {problem.question}\nAnswer: {solution}\n\n"


def gsm8k_prompts(
    tokenizer: Any, problems: list[Any], examples: list[Any], length: int
) -> list[list[int]]:
    """One prompt of exactly ``length`` tokens per problem, each with its own run of
    ``examples`` (never the problem itself)."""
    prompts = []
    for index, problem in enumerate(problems):
        shots = (
            worked_example(p)
            for p in itertools.islice(itertools.cycle(examples), index * 7, None)
            if p.id != problem.id
        )
        user = f"Here are worked examples.\n\n{{shots}}Question: {problem.question}\nAnswer:"
        prompts.append(fit_prompt(tokenizer, SYSTEM, user, shots, length, "--prompt-tokens"))
    return prompts


def answer_text(tokenizer: Any, ids: list[int]) -> str:
    """The decoded answer, cut at the first end-of-turn or new question."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for stop in STOPS:
        text = text.split(stop, 1)[0]
    return text.strip()


def answer_with_each_cache(
    small: Any, large: Any, tokenizer: Any, ids: Any, budget: float, tokens: int, names: list[str]
) -> dict[str, tuple[list[str], float]]:
    """Greedy answers to the prompts ``ids`` (one batch, one shared prefill) with each named
    cache, until every row has ended its turn: ``{name: (texts, kv_bytes_ratio)}``."""
    from collab_agent.cache import Full, decode

    shared = SharedPrefill(small, large, ids)
    stops = {i for i in map(tokenizer.convert_tokens_to_ids, END_OF_TURN) if isinstance(i, int)}
    answers = {}
    for name in names:
        start = time.perf_counter()
        method = Full() if name == "full" else make_method(name, small)
        cache = shared.cache_for(method.attach(large))
        if name != "full":
            cache = cache.clone(budgets=[budget] * ids.shape[0])
        out = decode(large, cache, shared.last, tokens, keep_logits=False, stop_ids=stops)
        answers[name] = (
            [answer_text(tokenizer, r) for r in out.tokens.tolist()],
            out.kv_bytes_ratio,
        )
        if hasattr(method, "detach"):
            method.detach()
        log(f"[kv-gsm8k]   {name}: {time.perf_counter() - start:.0f} s")
    return answers


def run_kv_gsm8k(
    small: Any,
    large: Any,
    tokenizer: Any,
    problems: list[Any],
    examples: list[Any],
    budget: float,
    prompt_tokens: int,
    tokens: int,
    methods: tuple[str, ...],
    batch_size: int = 10,
) -> dict[str, Any]:
    """The benchmark on loaded models; returns the JSON object `bench kv-gsm8k` prints. The
    problems run ``batch_size`` at a time (memory)."""
    import torch

    from collab_agent.evaluation.grading import extract_answer, is_correct

    device = next(large.parameters()).device
    prompts = gsm8k_prompts(tokenizer, problems, examples, prompt_tokens)
    names = ["full", *methods]
    texts: dict[str, list[str]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for first in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[first : first + batch_size], device=device)
        log(f"[kv-gsm8k] problems {first + 1}-{first + ids.shape[0]} of {len(prompts)}")
        for name, (got, ratio) in answer_with_each_cache(
            small, large, tokenizer, ids, budget, tokens, names
        ).items():
            texts[name] += got
            ratios[name].append(ratio)
    result: dict[str, Any] = {"methods": {}, "answers": {}, "texts": texts}
    full = [extract_answer(text) for text in texts["full"]]
    for name in names:
        answers = [extract_answer(text) for text in texts[name]]
        correct = [is_correct(a, p.answer) for a, p in zip(answers, problems, strict=True)]
        result["methods"][name] = {
            "accuracy": round(sum(correct) / len(problems), 4),
            "correct": sum(correct),
            "same_answer_as_full": sum(a == f for a, f in zip(answers, full, strict=True)),
            "kv_bytes_ratio": round(sum(ratios[name]) / len(ratios[name]), 4),
        }
        result["answers"][name] = answers
        log(f"[kv-gsm8k] {name}: {result['methods'][name]}")
    result.update(
        problems=[p.id for p in problems],
        budget=budget,
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        budget_accounting="prompt compressed to budget; decoded tokens add to the allowance",
    )
    return result


def register(bench: typer.Typer) -> None:
    """Add ``kv-gsm8k`` to the ``bench`` sub-app."""

    @bench.command("kv-gsm8k")
    def kv_gsm8k(
        models: Annotated[
            str, typer.Option(help="bundled (Qwen 0.5B assists 1.5B) or tiny.")
        ] = "bundled",
        budget: Annotated[float, typer.Option(help="KV budget of every method.")] = 0.1,
        problems: Annotated[int, typer.Option(help="GSM8K problems (from --first on).")] = 20,
        first: Annotated[int, typer.Option(help="Index of the first problem.")] = 0,
        prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 1024,
        tokens: Annotated[
            int,
            typer.Option(help="Greedy answer tokens (256 cut 18 of 20 full-cache answers short)."),
        ] = 512,
        batch_size: Annotated[
            int, typer.Option(help="Problems decoded together (memory grows with it).")
        ] = 10,
        methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = (
            "smallkv,h2o,snapkv,streaming,expected"
        ),
        data: Annotated[
            str, typer.Option(help="GSM8K JSON Lines (a bundled name or a path).")
        ] = "gsm8k_test",
        as_json: JsonOption = False,
    ) -> None:
        """The large model's GSM8K accuracy with each KV cache at one budget."""
        import torch

        from collab_agent.bench.kv import parse_methods
        from collab_agent.errors import ConfigError
        from collab_agent.evaluation.datasets import load_dataset

        if not 0 < budget <= 1:
            raise ConfigError("--budget", f"must lie in (0, 1], got {budget}")
        if first < 0:
            raise ConfigError("--first", f"must be >= 0, got {first}")
        if problems < 1 or tokens < 2 or batch_size < 1:
            raise ConfigError(
                "--problems/--tokens/--batch-size", "need at least 1 problem, 2 tokens, batch 1"
            )
        method_list = parse_methods(methods)
        records = load_dataset(data)
        if len(records) < first + problems + 8 or "solution" not in records[0].extra:
            raise ConfigError(
                "--data",
                f"needs GSM8K records with a 'solution' and more than {first + problems} of them",
            )
        torch.manual_seed(0)
        with torch.inference_mode():
            small, large, tokenizer = load_models(models)
            result = run_kv_gsm8k(
                small,
                large,
                tokenizer,
                records[first : first + problems],
                records[:first] + records[first + problems :],  # the few-shot examples
                budget,
                prompt_tokens,
                tokens,
                method_list,
                batch_size,
            )
        result["models"] = models
        result["first"] = first
        if as_json:
            print(json.dumps(result))
            return
        print(f"{'method':<22} {'accuracy':>8} {'same as full':>13} {'bytes':>7}")
        for name, cell in result["methods"].items():
            print(
                f"{name:<22} {cell['accuracy']:>8.3f} {cell['same_answer_as_full']:>13} "
                f"{cell['kv_bytes_ratio']:>7.3f}"
            )
