"""One `ReasoningConfig` holds the reasoning settings, and every entry point hands it to the
reasoner: a setting given to `Reasoner`, `CollabChatModel` or ``evaluate`` changes what runs.
The modules that moved into `collab_agent.core` are still importable from their old paths."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest

from collab_agent import ReasoningConfig, defaults
from collab_agent.core.formats import LINE, THINK
from collab_agent.errors import ConfigError
from collab_agent.evaluation.datasets import Problem
from collab_agent.evaluation.runner import EVAL_CONFIG, evaluate
from collab_agent.langchain import CollabChatModel
from collab_agent.policies import SmallOnly
from collab_agent.reasoner import Reasoner
from collab_agent.testing import ScriptedBackend
from collab_agent.types import Sampling

STEPS = [f"Step {i} of the reasoning." for i in range(12)]
"""Small-model steps that never reach an answer, so the step cap decides where reasoning ends."""


def scripted() -> tuple[ScriptedBackend, ScriptedBackend]:
    return ScriptedBackend(STEPS, name="srm"), ScriptedBackend([], name="lrm")


# ============================================================================ the config itself
def test_defaults_come_from_the_defaults_module() -> None:
    config = ReasoningConfig()
    assert (config.temperature, config.top_p, config.seed) == (
        defaults.TEMPERATURE,
        defaults.TOP_P,
        None,
    )
    assert (config.max_steps, config.step_max_tokens, config.answer_max_tokens) == (
        defaults.MAX_STEPS,
        defaults.STEP_MAX_TOKENS,
        defaults.ANSWER_MAX_TOKENS,
    )
    assert config.budget is None  # the default budget, capped to the context
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_steps", 0),
        ("step_max_tokens", -1),
        ("answer_max_tokens", 1.5),
        ("budget", 0),
        ("temperature", 3.0),
        ("top_p", 0.0),
        ("seed", "7"),
        ("splitter", "words"),
        ("format", "chain-of-thought"),
    ],
)
def test_a_bad_setting_is_named(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        ReasoningConfig(**{name: value})
    assert raised.value.argument == name


def test_names_resolve_and_override_keeps_what_is_not_given() -> None:
    config = ReasoningConfig(format="think", splitter="line")
    assert config.format is THINK and config.splitter is LINE
    changed = config.override(max_steps=3, budget=None, sampling=Sampling(0.5, 0.9, 1), seed=2)
    assert (changed.max_steps, changed.budget, changed.format) == (3, None, THINK)
    assert changed.sampling == Sampling(0.5, 0.9, 2)  # a seed beside sampling wins
    with pytest.raises(ConfigError, match="max_step"):
        config.override(max_step=3)


# ============================================================================ it reaches the reasoner
async def test_the_reasoner_runs_with_its_config_and_keywords_override_it() -> None:
    small, large = scripted()
    config = ReasoningConfig(max_steps=5, step_max_tokens=30, temperature=0.4, seed=9)
    reasoner = Reasoner(small, large, SmallOnly(), config=config, max_steps=2)
    trace = await reasoner.run([{"role": "user", "content": "Go."}])
    assert len(trace.steps) == 2 and trace.stop_reason == "max_steps"
    assert reasoner.settings.max_steps == reasoner.max_steps == 2
    assert small.requests[0].max_tokens == 30
    assert small.requests[0].sampling == Sampling(0.4, defaults.TOP_P, 9)


async def test_the_chat_model_builds_the_reasoners_config_from_its_fields() -> None:
    small, large = scripted()
    model = CollabChatModel(
        small=small,
        large=large,
        policy=SmallOnly(),
        max_steps=3,
        step_max_tokens=40,
        max_tokens=9,
        temperature=0.3,
        seed=7,
    )
    result = await model.ainvoke("Go.")
    collab = result.response_metadata["collab"]
    assert len(collab["steps"]) == 3 and collab["stop_reason"] == "max_steps"
    step, answer = small.requests[0], small.requests[-1]
    assert step.max_tokens == 40 and answer.max_tokens == 9
    assert step.sampling == Sampling(0.3, defaults.TOP_P, 7)


@pytest.mark.parametrize("max_steps", [2, 4])
async def test_eval_runs_every_problem_with_its_config(max_steps: int) -> None:
    small, large = scripted()
    config = dataclasses.replace(EVAL_CONFIG, max_steps=max_steps, seed=10)
    report = await evaluate(
        [Problem("p1", "What is 2 + 2?", "4")],
        ["small-only"],
        small=small,
        large=large,
        samples=2,
        config=config,
    )
    assert [r.steps_by_author["small"] for r in report.records] == [max_steps, max_steps]
    assert {r.stop_reason for r in report.records} == {"max_steps"}
    assert {r.sampling.seed for r in small.requests} == {10, 11}  # seed + sample index
    assert {r.max_tokens for r in small.requests if r.purpose != "answer"} == {256}


async def test_evals_keywords_override_its_config() -> None:
    small, large = scripted()
    report = await evaluate(
        [Problem("p1", "What is 2 + 2?", "4")],
        ["small-only"],
        small=small,
        large=large,
        config=ReasoningConfig(max_steps=6),
        max_steps=1,
    )
    assert report.records[0].steps_by_author["small"] == 1


# ============================================================================ old import paths
@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("reasoner", "reasoner"),
        ("session", "session"),
        ("trace", "trace"),
        ("context", "context"),
        ("streaming", "streaming"),
        ("prompting", "formats"),
        ("splitting", "formats"),
    ],
)
def test_the_old_module_paths_still_import_the_same_objects(old: str, new: str) -> None:
    shim = importlib.import_module(f"collab_agent.{old}")
    moved = importlib.import_module(f"collab_agent.core.{new}")
    assert shim.__all__
    for name in shim.__all__:
        assert getattr(shim, name) is getattr(moved, name), name


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("collab_agent.cli.evaluate", "eval_command"),
        ("collab_agent.cli.calibrate", "calibrate_command"),
    ],
)
def test_eval_and_calibrate_default_to_the_evaluation_config(module: str, command: str) -> None:
    import importlib
    import inspect

    parameters = inspect.signature(getattr(importlib.import_module(module), command)).parameters
    for name in ("max_steps", "step_max_tokens", "answer_max_tokens", "temperature"):
        default = parameters[name].default
        assert default == getattr(EVAL_CONFIG, name), (command, name, default)
