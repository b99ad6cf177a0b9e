"""Threshold sweeps (`eval --sweep`): parsing, expansion into policies, the Pareto frontier, and
the plot and summary an evaluation writes for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_runner import PROBLEMS, eval_app, one_problem_file, pair

from collab_agent.errors import ConfigError
from collab_agent.evaluation.runner import PLOT_FILE, SUMMARY_FILE, evaluate
from collab_agent.evaluation.sweep import (
    Sweep,
    expand_sweeps,
    family_of,
    pareto_frontier,
    parse_sweep,
)
from collab_agent.policies.trigreason import CognitiveOffload


def test_a_sweep_is_parsed_into_typed_values() -> None:
    assert parse_sweep("trigreason:rho=0.6, 0.75,0.9") == Sweep(
        "trigreason", "rho", (0.6, 0.75, 0.9)
    )
    assert parse_sweep("specreason:threshold=3,5") == Sweep("specreason", "threshold", (3, 5))
    user = parse_sweep("my_pkg.policies:make:threshold=1,2")
    assert user.policy == "my_pkg.policies:make" and user.parameter == "threshold"
    assert parse_sweep("surprise:statistic=mean_nll,low_prob_share").values == (
        "mean_nll",
        "low_prob_share",
    )
    assert Sweep("trigreason", "rho", (0.6, 0.75)).names() == [
        "trigreason[rho=0.6]",
        "trigreason[rho=0.75]",
    ]
    assert (
        family_of("trigreason[rho=0.6]") == "trigreason" and family_of("large-only") == "large-only"
    )


@pytest.mark.parametrize(
    "text",
    ["trigreason", "trigreason:rho", "rho=0.5,0.6", "trigreason:rho=0.5", "t:rho=1,1", "t:2x=1,2"],
)
def test_a_malformed_sweep_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--sweep"):
        parse_sweep(text)


def test_each_swept_value_reaches_its_trigger() -> None:
    policies = expand_sweeps(
        [parse_sweep("trigreason:rho=0.6,0.9")], {"trigreason": {"priming_steps": 2}}
    )
    assert list(policies) == ["trigreason[rho=0.6]", "trigreason[rho=0.9]"]
    for name, rho in (("trigreason[rho=0.6]", 0.6), ("trigreason[rho=0.9]", 0.9)):
        policy = policies[name]
        assert policy.name == name
        offload = next(t for t in policy.triggers if isinstance(t, CognitiveOffload))
        assert offload.rho == rho
        assert policy.triggers[0].steps == 2  # type: ignore[attr-defined]  # the other options too


def test_an_unknown_parameter_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="does not take colour=1"):
        expand_sweeps([parse_sweep("trigreason:colour=1,2")])


def test_the_pareto_frontier_drops_dominated_policies() -> None:
    summary = {
        "large-only": {"small_token_share": 0.0, "accuracy": 0.60},
        "a": {"small_token_share": 0.5, "accuracy": 0.58},
        "b": {"small_token_share": 0.4, "accuracy": 0.50},  # a beats it on both
        "c": {"small_token_share": 0.8, "accuracy": 0.40},
        "d": {"small_token_share": 0.8, "accuracy": 0.30},  # c: same share, better accuracy
        "small-only": {"small_token_share": 1.0, "accuracy": 0.30},
    }
    assert pareto_frontier(summary) == ["large-only", "a", "c", "small-only"]


async def test_a_swept_judge_threshold_traces_the_trade_off(tmp_path: Path) -> None:
    small, large = pair(score="5")  # the judge gives every small step a 5
    swept = expand_sweeps([parse_sweep("specreason:threshold=3,9")])
    report = await evaluate(
        PROBLEMS, ["small-only", *swept.values()], small=small, large=large, out=tmp_path
    )
    low, high = report.summary["specreason[threshold=3]"], report.summary["specreason[threshold=9]"]
    assert low["small_token_share"] == 1.0 and low["accuracy"] == pytest.approx(1 / 3)
    assert high["small_token_share"] == 0.0 and high["accuracy"] == 1.0
    assert high["pareto"] and low["pareto"]
    written = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert set(written) == {"small-only", "specreason[threshold=3]", "specreason[threshold=9]"}
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(b"\x89PNG")


def test_eval_command_sweeps_on_tiny_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    app, data = eval_app(), one_problem_file(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data", str(data),
            "--models", "tiny",
            "--policy", "large-only",
            "--sweep", "trigreason:rho=0.5,0.95",
            "--limit", "1",
            "--budget", "8",
            "--step-max-tokens", "4",
            "--answer-max-tokens", "4",
            "--out", str(tmp_path / "out"),
            "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary) == ["large-only", "trigreason[rho=0.5]", "trigreason[rho=0.95]"]
    assert any(f["pareto"] for f in summary.values())
    bad = CliRunner().invoke(
        app, ["eval", "--data", str(data), "--models", "tiny", "--sweep", "trigreason:rho=0.5"]
    )
    assert isinstance(bad.exception, ConfigError) and bad.exception.argument == "--sweep"
