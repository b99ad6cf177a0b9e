"""Calibration per model pair: on a synthetic pair it reaches its target share, picks
the signal that knows when the small model is wrong, and writes a policy file that loads back."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation
from collab_agent.calibration import (
    SignalRecorder,
    StepRecord,
    auroc,
    calibrate,
    candidates_by_name,
    load_policy_file,
    policy_from_dict,
    policy_to_dict,
    replay_signals,
    run_policy,
    save_policy_file,
    signal_quality,
    threshold_for_fraction,
    threshold_options,
)
from collab_agent.errors import BackendError, CapabilityError, ConfigError
from collab_agent.evaluation.datasets import Problem
from collab_agent.policies import (
    CognitiveOffload,
    Policy,
    SmallOnly,
    StrategicPriming,
    TrigReason,
)
from collab_agent.policies.signals import LargeSurprise, Repetition
from collab_agent.reasoner import Reasoner

STEPS = 6  # reasoning steps before the answer line


class Synthetic:
    """A deterministic model of a synthetic pair that answers from the prefix it is given.

    Problem ``i`` has ``STEPS`` steps. The small model's step 2 of every odd problem is wrong
    (the word "wrong"), and its final answer is right only when no wrong step is left in the
    reasoning; its own token logprobs carry no information about that. The large model always
    writes careful steps, answers right, and finds a wrong step surprising when it scores it.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.name = f"synthetic-{role}"
        self.scores = 0

    @staticmethod
    def _where(request: GenerateRequest) -> tuple[int, int]:
        user = next(m for m in reversed(request.messages) if m["role"] == "user")
        problem = int(re.search(r"Problem (\d+)", user["content"]).group(1))  # type: ignore[union-attr]
        return problem, request.reasoning.count("\n\n")

    def _text(self, problem: int, k: int, reasoning: str) -> str:
        if self.role == "large":
            return (
                "Final answer: 42"
                if k >= STEPS
                else f"Careful step {k} of problem {problem} done right now"
            )
        if k >= STEPS:
            return "Final answer: 41" if "wrong" in reasoning else "Final answer: 42"
        verdict = "wrong" if problem % 2 == 1 and k == 2 else "fine"
        return f"Step {k} of problem {problem}: {verdict} idea number {k}"

    async def generate(self, request: GenerateRequest) -> Generation:
        started = time.perf_counter()
        problem, k = self._where(request)
        if request.purpose == "answer":
            text = "41" if self.role == "small" and "wrong" in request.reasoning else "42"
        else:
            text = self._text(problem, k, request.reasoning)
        words = len(text.split())
        nll = ((problem * 7 + k * 3) % 10) / 10 + 0.05  # uninformative small-model confidence
        return Generation(
            text=text,
            stop_reason="answer" if text.startswith("Final") else "step",
            logprobs=[-nll] * words if request.logprobs else None,
            prompt_tokens=len(request.reasoning.split()) + 20,
            completion_tokens=words,
            seconds=time.perf_counter() - started,
        )

    async def score(self, request: GenerateRequest, continuation: str) -> list[float]:
        self.scores += 1
        return [-3.0 if "wrong" in continuation else -0.2] * len(continuation.split())


PROBLEMS = [
    Problem(id=f"p{i}", question=f"Problem {i}: what is the answer?", answer="42")
    for i in range(10)
]


def grader(answer: str, problem: Problem) -> bool:
    return answer.strip() == problem.answer


def make_reasoner(policy: Policy) -> Reasoner:
    return Reasoner(Synthetic("small"), Synthetic("large"), policy, sampling=GREEDY)


# ------------------------------------------------------------------------- calibration
async def test_calibration_reaches_the_target_share_with_the_signal_that_knows_the_small_model_is_wrong() -> (
    None
):
    result = await calibrate(
        make_reasoner,
        PROBLEMS,
        target_share=0.6,
        candidates=candidates_by_name(
            ["large_surprise", "small_uncertainty", "repetition", "cognitive_offload"]
        ),
        priming_steps=0,
        grader=grader,
    )
    assert result.small_only.accuracy == 0.5 and result.large_only is not None
    assert result.large_only.accuracy == 1.0
    chosen = result.chosen
    assert chosen is not None and chosen.name == "large_surprise" and chosen.reached
    assert chosen.chosen is not None
    assert chosen.chosen.small_token_share >= 0.6
    assert chosen.chosen.accuracy == 1.0  # large-only accuracy at a majority small share
    # the policy is the chosen trigger at the chosen threshold
    (trigger,) = result.policy.triggers
    assert isinstance(trigger, LargeSurprise) and trigger.threshold == chosen.chosen.threshold
    # AUROC: the large model's surprise separates wrong from right answers, the small model's
    # own confidence does not
    assert result.signals["large_surprise"]["problem_auroc"] == 1.0
    assert result.signals["small_uncertainty"]["problem_auroc"] < 0.8
    report = result.to_dict()
    assert report["reached_target"] and report["chosen"] == "large_surprise"
    assert report["problems"] == [p.id for p in PROBLEMS]
    json.dumps(report)  # the report is plain JSON


@pytest.mark.parametrize("target", [0.5, 0.7, 0.85])
async def test_threshold_search_reaches_each_target_share(target: float) -> None:
    result = await calibrate(
        make_reasoner,
        PROBLEMS,
        target_share=target,
        candidates=candidates_by_name(["small_uncertainty"]),
        priming_steps=0,
        rounds=4,
        run_large_only=False,
        grader=grader,
    )
    (candidate,) = result.candidates
    assert candidate.reached and candidate.chosen is not None
    assert target <= candidate.chosen.small_token_share <= target + 0.2
    # a rerun of the chosen policy measures the same share: the figure is real, not estimated
    rerun = await run_policy(make_reasoner, result.policy, PROBLEMS, grader=grader)
    assert rerun.small_token_share == pytest.approx(candidate.chosen.small_token_share)


async def test_priming_is_kept_in_the_calibrated_policy() -> None:
    result = await calibrate(
        make_reasoner,
        PROBLEMS,
        target_share=0.6,
        candidates=candidates_by_name(["large_surprise"]),
        priming_steps=1,
        run_large_only=False,
        grader=grader,
    )
    assert isinstance(result.policy.triggers[0], StrategicPriming)
    assert result.policy.triggers[0].steps == 1
    assert result.chosen is not None and result.chosen.reached


async def test_calibration_rejects_bad_arguments_naming_them() -> None:
    for kwargs, argument in [
        ({"target_share": 1.0}, "target_share"),
        ({"rounds": 0}, "rounds"),
        ({"candidates": []}, "candidates"),
    ]:
        with pytest.raises(ConfigError) as error:
            await calibrate(make_reasoner, PROBLEMS, grader=grader, **kwargs)  # type: ignore[arg-type]
        assert error.value.argument == argument
    with pytest.raises(ConfigError) as error:
        await calibrate(make_reasoner, [], grader=grader)
    assert error.value.argument == "problems"
    with pytest.raises(ConfigError) as error:
        candidates_by_name(["large_surprise", "vibes"])
    assert error.value.argument == "signals"


async def test_signal_recorder_measures_every_small_step_and_never_fires() -> None:
    recorder = SignalRecorder(candidates=candidates_by_name(["large_surprise", "repetition"]))
    policy = Policy((recorder,), name="small-only", answer_by="small")
    large = Synthetic("large")
    trace = await Reasoner(Synthetic("small"), large, policy).run(
        PROBLEMS[1].messages(), conversation_id="c1"
    )
    records = recorder.records["c1"]
    assert all(s.author == "small" for s in trace.steps) and trace.firings == []
    assert [r.index for r in records] == list(range(STEPS + 1))  # the answer step too
    assert records[2].values["large_surprise"] == 3.0 and records[1].values[
        "large_surprise"
    ] == pytest.approx(0.2)
    assert records[0].values["repetition"] is None  # nothing earlier to repeat
    assert records[STEPS].values["large_surprise"] is None  # 3 tokens < min_tokens
    assert large.scores == STEPS


async def test_replayed_signals_equal_the_live_ones_on_the_same_steps() -> None:
    names = ["large_surprise", "small_uncertainty", "repetition", "cognitive_offload"]
    recorder = SignalRecorder(candidates=candidates_by_name(names))
    policy = Policy((recorder,), name="small-only", answer_by="small")
    reasoner = Reasoner(Synthetic("small"), Synthetic("large"), policy, sampling=GREEDY)
    problems = PROBLEMS[:4]
    traces = [await reasoner.run(p.messages(), conversation_id=f"live-{p.id}") for p in problems]
    large = Synthetic("large")
    recording = await replay_signals(
        [(p, t, grader(t.answer, p)) for p, t in zip(problems, traces, strict=True)],
        candidates_by_name(names),
        large=large,
        concurrency=2,
    )
    assert [r.problem_id for r in recording.small_only.problems] == [p.id for p in problems]
    assert recording.small_only.accuracy == 0.5  # problems 1 and 3 go wrong
    for problem, trace, run in zip(problems, traces, recording.small_only.problems, strict=True):
        live = {r.index: r.values for r in recorder.records[f"live-{problem.id}"]}
        replayed = recording.records[run.conversation_id]
        assert [r.index for r in replayed] == [s.index for s in trace.steps]
        for r in replayed:
            assert r.values == pytest.approx(live[r.index])
    assert large.scores == sum(len(t.steps) for t in traces)  # one score per step, as live
    assert recording.signals["large_surprise"]["problem_auroc"] == 1.0


async def test_replay_without_a_large_model_names_what_is_missing() -> None:
    reasoner = Reasoner(Synthetic("small"), Synthetic("large"), SmallOnly(), sampling=GREEDY)
    trace = await reasoner.run(PROBLEMS[0].messages())
    recording = await replay_signals(
        [(PROBLEMS[0], trace, True)], candidates_by_name(["small_uncertainty"])
    )
    assert recording.signals["small_uncertainty"]["measured_steps"] == len(trace.steps)
    with pytest.raises(CapabilityError, match="no large model given"):
        await replay_signals([(PROBLEMS[0], trace, True)], candidates_by_name(["large_surprise"]))


# ------------------------------------------------------------------------- runs of a policy
class FailingSmall(Synthetic):
    """The small model of the synthetic pair, whose server fails on problem 3."""

    async def generate(self, request: GenerateRequest) -> Generation:
        if self._where(request)[0] == 3:
            raise BackendError("small model: server error")
        return await super().generate(request)


async def test_a_policy_run_answers_concurrently_in_problem_order_on_fresh_conversations() -> None:
    seen: list[tuple[str, str]] = []
    run = await run_policy(
        make_reasoner,
        SmallOnly(),
        PROBLEMS,
        grader=grader,
        concurrency=4,
        on_problem=lambda policy, problem: seen.append((policy, problem.problem_id)),
    )
    assert [p.problem_id for p in run.problems] == [p.id for p in PROBLEMS]
    assert sorted(seen) == sorted(("small-only", p.id) for p in PROBLEMS)
    assert run.accuracy == 0.5  # the odd problems go wrong
    again = await run_policy(make_reasoner, SmallOnly(), PROBLEMS[:1], grader=grader)
    ids = [p.conversation_id for p in run.problems + again.problems]
    assert len(set(ids)) == len(ids) and all(i.startswith("calibrate-small-only-p") for i in ids)


async def test_a_failing_problem_stops_the_policy_run() -> None:
    def failing(policy: Policy) -> Reasoner:
        return Reasoner(FailingSmall("small"), Synthetic("large"), policy, sampling=GREEDY)

    with pytest.raises(ExceptionGroup) as info:  # raised out of the runner's task group
        await run_policy(failing, SmallOnly(), PROBLEMS[:5], grader=grader, concurrency=2)
    assert info.group_contains(BackendError, match="server error")


# ------------------------------------------------------------------------- statistics
def test_auroc() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3, 0.4], [True, True]) is None


def test_signal_quality_scores_measured_steps_and_each_problem_by_its_top_step() -> None:
    records = {
        "wrong": [
            StepRecord(0, 5, {"s": 0.9}),
            StepRecord(1, 5, {"s": None}),
            StepRecord(2, 5, {"s": 0.7}),
        ],
        "right": [StepRecord(0, 5, {"s": 0.1}), StepRecord(1, 5, {"s": 0.8})],
        "unmeasured": [StepRecord(0, 5, {"s": None})],
    }
    quality = signal_quality(records, {"wrong": True, "right": False, "unmeasured": True}, "s")
    assert quality["step_auroc"] == 0.75  # 0.7 ranks below the right problem's 0.8
    assert quality["problem_auroc"] == 1.0  # 0.9 against 0.8; no value, no problem score
    assert quality["measured_steps"] == 4
    assert quality["mean_in_wrong"] == pytest.approx(0.8)
    assert quality["mean_in_right"] == pytest.approx(0.45)


def test_threshold_for_fraction_is_token_weighted() -> None:
    records = {
        "a": [StepRecord(0, 10, {"s": 1.0}), StepRecord(1, 30, {"s": 2.0})],
        "b": [StepRecord(0, 60, {"s": 3.0}), StepRecord(1, 5, {"s": None})],
    }
    threshold, fraction = threshold_for_fraction(records, "s", 0.6)
    assert threshold == 2.5 and fraction == pytest.approx(60 / 105)
    threshold, fraction = threshold_for_fraction(records, "s", 0.0)
    assert threshold == 3.0 and fraction == 0.0
    threshold, fraction = threshold_for_fraction(records, "s", 1.0)
    assert threshold < 1.0 and fraction == pytest.approx(100 / 105)


def test_sticky_threshold_options_count_every_step_after_the_first_firing() -> None:
    records = {
        "a": [
            StepRecord(0, 10, {"s": 1.0}),
            StepRecord(1, 20, {"s": 3.0}),
            StepRecord(2, 30, {"s": 0.5}),
        ]
    }
    plain = dict(threshold_options(records, "s"))
    sticky = dict(threshold_options(records, "s", sticky=True))
    assert plain[2.0] == pytest.approx(20 / 60)  # only the step above 2.0
    assert sticky[2.0] == pytest.approx(50 / 60)  # that step and every later one
    # candidates of escalating triggers search with the sticky accounting
    (escalation,) = candidates_by_name(["escalation"])
    assert escalation.sticky and escalation.build(1.5).escalate  # type: ignore[attr-defined]
    assert not candidates_by_name(["small_min_prob"])[0].sticky


async def test_calibrating_an_escalating_trigger_reaches_its_target_share() -> None:
    result = await calibrate(
        make_reasoner,
        PROBLEMS,
        target_share=0.5,
        candidates=candidates_by_name(["escalation"]),
        priming_steps=0,
        rounds=4,
        run_large_only=False,
        grader=grader,
    )
    (candidate,) = result.candidates
    assert candidate.reached and candidate.chosen is not None
    assert 0.5 <= candidate.chosen.small_token_share <= 0.7
    (trigger,) = result.policy.triggers
    assert trigger.escalate  # type: ignore[attr-defined]
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(result.policy)))) == result.policy


# ------------------------------------------------------------------------- policy files
def test_policy_file_round_trip(tmp_path: Path) -> None:
    policy = Policy(
        (
            StrategicPriming(steps=2),
            LargeSurprise(threshold=1.7, statistic="low_prob_share", low_prob=0.05),
            Repetition(threshold=0.6, n=8, window=3),
            CognitiveOffload(rho=0.7),
        ),
        name="mine",
        answer_by="large",
    )
    path = save_policy_file(policy, tmp_path / "p.json", {"note": "hand-made"})
    loaded = load_policy_file(path)
    assert loaded == policy
    data = json.loads(path.read_text())
    assert data["triggers"][1] == {
        "type": "large_surprise",
        "threshold": 1.7,
        "min_tokens": 4,
        "escalate": False,
        "statistic": "low_prob_share",
        "low_prob": 0.05,
    }
    assert data["calibration"] == {"note": "hand-made"}


def test_trigreason_round_trips_through_a_policy_file() -> None:
    policy = TrigReason(priming_steps=3, rho=0.75)
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(policy)))) == policy


async def test_a_loaded_policy_file_runs_in_the_reasoner(tmp_path: Path) -> None:
    path = save_policy_file(
        Policy((LargeSurprise(threshold=1.0),), name="calibrated"), tmp_path / "p.json"
    )
    trace = await make_reasoner(load_policy_file(path)).run(PROBLEMS[1].messages())
    assert trace.policy == "calibrated" and trace.trigger_counts == {"large_surprise": 1}
    assert trace.answer == "42"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a collab-agent policy file"),
        ('{"format": "collab-agent-policy", "version": 9}', "version 9"),
        (
            '{"format": "collab-agent-policy", "version": 1, "triggers": [{"type": "vibes"}]}',
            "unknown trigger type 'vibes'",
        ),
        (
            '{"format": "collab-agent-policy", "version": 1, "triggers": [{"type": "repetition", "k": 1}]}',
            "bad fields for 'repetition'",
        ),
        (
            '{"format": "collab-agent-policy", "version": 1, "triggers": [{"type": "repetition", "n": 0}]}',
            "n: must be a positive integer",
        ),
    ],
)
def test_bad_policy_files_raise_config_error_naming_the_file(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        load_policy_file(path)
    if content is not None and "n: must" not in message:
        assert str(path) in str(error.value)


# ------------------------------------------------------------------------- the command
def test_calibrate_command_writes_a_policy_file_on_the_tiny_pair(tmp_path: Path) -> None:
    from collab_agent.calibrate_cli import register

    data = tmp_path / "dev.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"id": i, "question": f"What is {i} + 1?", "answer": str(i + 1)})
            for i in range(2)
        )
    )
    out = tmp_path / "policy.json"
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep calibrate a named subcommand
    args = [
        "calibrate", "--models", "tiny", "--data", str(data), "--out", str(out), "--limit", "2",
        "--signals", "large_surprise,repetition", "--rounds", "1", "--no-large-only",
        "--budget", "12", "--max-steps", "2", "--step-max-tokens", "6", "--answer-max-tokens", "2",
        "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == ["0", "1"] and report["small_spec"] == "tiny:0"
    assert set(report["signals"]) == {"large_surprise", "repetition"}
    policy = load_policy_file(out)
    assert policy.name == "calibrated"
    assert json.loads(out.read_text())["calibration"]["target_share"] == 0.6


def test_calibrate_record_only_writes_the_signal_report(tmp_path: Path) -> None:
    from collab_agent.calibrate_cli import register

    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "What is 2 + 2?", "answer": "4"}))
    out = tmp_path / "signals.json"
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    args = [
        "calibrate", "--record-only", "--models", "tiny", "--data", str(data), "--out", str(out),
        "--signals", "small_uncertainty,repetition", "--budget", "8", "--max-steps", "2",
        "--step-max-tokens", "4", "--answer-max-tokens", "2",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["signals"]) == {"small_uncertainty", "repetition"}
    (problem,) = report["problems"].values()
    assert problem["steps"] and {"index", "tokens", "small_uncertainty"} <= set(problem["steps"][0])
    assert "format" not in report  # a report, not a policy file


def test_calibrate_traces_reports_the_signals_of_an_eval_run(tmp_path: Path) -> None:
    from test_eval_runner import eval_app, one_problem_file

    from collab_agent.calibrate_cli import register

    data = one_problem_file(tmp_path)
    runs = tmp_path / "runs"
    evaluated = CliRunner().invoke(
        eval_app(),
        [
            "eval", "--data", str(data), "--models", "tiny", "--policy", "small-only",
            "--budget", "12", "--step-max-tokens", "4", "--answer-max-tokens", "2",
            "--out", str(runs), "--json",
        ],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "signals.json"
    args = [
        "calibrate", "--traces", str(runs), "--models", "tiny", "--data", str(data),
        "--out", str(out), "--signals", "large_surprise,small_min_prob,repetition",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["traces"] == str(runs) and report["large_spec"] == "tiny:1"
    (problem,) = report["problems"].values()
    recorded = [json.loads(line) for line in (runs / "traces.jsonl").read_text().splitlines()]
    steps = recorded[0]["trace"]["steps"]
    assert [s["index"] for s in problem["steps"]] == [s["index"] for s in steps]
    for step, values in zip(steps, problem["steps"], strict=True):
        if step["tokens"] >= 4:  # the signals' min_tokens
            assert values["small_min_prob"] == pytest.approx(-min(step["logprobs"]))
            assert values["large_surprise"] is not None
    # a folder without small-only runs is named in the error
    empty = CliRunner().invoke(app, [*args[:2], str(tmp_path), *args[3:]])
    assert empty.exit_code != 0 and "--traces" in str(empty.exception)
