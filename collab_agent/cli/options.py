"""Command-line options shared by ``collab-agent`` commands (``run``, ``eval``, ``calibrate``,
``bench ...``), declared once so their names and help read the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

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
AnswerMaxTokensOption = Annotated[
    int, typer.Option("--answer-max-tokens", help="Most tokens of the answer.")
]

__all__ = [
    "AnswerMaxTokensOption",
    "ApiKeyEnvOption",
    "JsonOption",
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
