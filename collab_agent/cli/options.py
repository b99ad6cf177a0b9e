"""Command-line options shared by ``collab-agent`` commands (``run``, ``eval``, ``calibrate``,
``bench ...``), declared once so their names and help read the same everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent import defaults

if TYPE_CHECKING:
    from collab_agent.core.config import ReasoningConfig

ModelsOption = Annotated[
    str | None, typer.Option("--models", help="Preset pair: bundled (default), llamacpp or tiny.")
]
SmallOption = Annotated[
    str | None, typer.Option("--small", help="Small model spec, e.g. bundled:NAME.")
]
LargeOption = Annotated[
    str | None, typer.Option("--large", help="Large model spec, e.g. openai:MODEL@URL.")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads per model (torch's, or each llama.cpp server's); 1 is fastest "
        "when two models share a small CPU.",
    ),
]
SplitterOption = Annotated[
    str | None,
    typer.Option(
        "--splitter",
        help="Where a reasoning step ends: line (a line break; short lines merge; the bundled "
        "pair's default) or blank-line (the papers'; other models' default).",
    ),
]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 is greedy.")]
TopPOption = Annotated[
    float, typer.Option("--top-p", help="Nucleus sampling mass when temperature > 0.")
]
ThinkOption = Annotated[
    bool, typer.Option("--think/--no-think", help="The models reason inside <think> ... </think>.")
]
ApiKeyEnvOption = Annotated[
    str,
    typer.Option("--api-key-env", help="Environment variable holding the key of openai: specs."),
]
PrimingOption = Annotated[
    int,
    typer.Option(
        "--priming",
        help="TrigReason's priming steps (paper: 20; these short-step instruct models need 1-2).",
    ),
]
MaxStepsOption = Annotated[
    int, typer.Option("--max-steps", help="Most reasoning steps per problem.")
]
StepMaxTokensOption = Annotated[
    int, typer.Option("--step-max-tokens", help="Most tokens of one step.")
]
KvMethodOption = Annotated[
    str | None,
    typer.Option(
        "--kv-method",
        help="Compress the large model's KV cache: smallkv, h2o, snapkv, streaming, expected "
        "or full, with an optional budget as a share of the whole context, e.g. smallkv:0.25 "
        "(default: the method's own). Needs a large model running here (bundled:, hf:, tiny).",
    ),
]
AnswerMaxTokensOption = Annotated[
    int, typer.Option("--answer-max-tokens", help="Most tokens of the answer.")
]

__all__ = [
    "AnswerMaxTokensOption",
    "ApiKeyEnvOption",
    "JsonOption",
    "KvMethodOption",
    "LargeOption",
    "MaxStepsOption",
    "ModelsOption",
    "PrimingOption",
    "SmallOption",
    "SplitterOption",
    "StepMaxTokensOption",
    "TemperatureOption",
    "ThinkOption",
    "ThreadsOption",
    "TopPOption",
]


def reasoning_config(
    *,
    think: bool,
    temperature: float,
    top_p: float = defaults.TOP_P,
    splitter: str | None = None,
    **limits: Any,
) -> ReasoningConfig:
    """The `ReasoningConfig` of a command's options, built before any model loads so a bad
    setting fails first; top-p applies only when sampling (temperature above 0). ``limits``:
    ``seed``, ``budget``, ``max_steps``, ``step_max_tokens``, ``answer_max_tokens``."""
    from collab_agent.core.config import ReasoningConfig
    from collab_agent.core.formats import STEPWISE, THINK, resolve_splitter

    return ReasoningConfig(
        format=THINK if think else STEPWISE,
        splitter=resolve_splitter(splitter, "--splitter") if splitter else None,
        temperature=temperature,
        top_p=1.0 if temperature == 0 else top_p,
        **limits,
    )
