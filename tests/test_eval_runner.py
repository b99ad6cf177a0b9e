"""The evaluation runner: same problems for every policy, concurrent, resumable, summarised with
the figure keys every script reads."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from collab_agent.backends.base import GREEDY, GenerateRequest, Generation, Sampling
from collab_agent.errors import BackendError, ConfigError
from collab_agent.evaluation.datasets import Problem
from collab_agent.evaluation.runner import (
    PLOT_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    ProblemRecord,
    evaluate,
    read_records,
)

PROBLEMS = [
    Problem("p1", "What is 2 + 2?", "4"),
    Problem("p2", "What is 3 * 3?", "9"),
    Problem("p3", "What is 10 - 7?", "3"),
]
SUMMARY_KEYS = {
    "accuracy",
    "relative_accuracy",
    "small_token_share",
    "small_step_share",
    "lrm_calls",
    "lrm_input_tokens",
    "lrm_output_tokens",
    "latency_s",
    "cost",
}


class AnsweringBackend:
    """A deterministic model: one reasoning step, then ``Final answer: X`` where X comes from
    ``answers`` (by question); judges every step with ``score``. Safe under concurrency."""

    def __init__(
        self,
        name: str,
        answers: dict[str, str],
        *,
        score: str = "9",
        delay: float = 0.0,
        fail_on: str | None = None,
        hang_on: str | None = None,
        price: float = 0.0,
    ) -> None:
        self.name = name
        self.answers = answers
        self.score = score
        self.delay = delay
        self.fail_on = fail_on
        self.hang_on = hang_on
        self.hanging = anyio.Event()
        self.price = price
        self.requests: list[GenerateRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def generate(self, request: GenerateRequest) -> Generation:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            question = next(m["content"] for m in request.messages if m["role"] == "user")
            if self.fail_on and self.fail_on in question:
                raise BackendError(f"{self.name}: server error")
            if self.hang_on and self.hang_on in question:
                self.hanging.set()
                await anyio.sleep_forever()
            if request.purpose == "judge":
                text = self.score
            elif not request.reasoning:
                text = "Let us compute it step by step."
            else:
                text = f"Final answer: {self.answers[question]}"
            tokens = len(text.split())
            return Generation(
                text=text,
                stop_reason="step" if request.purpose != "judge" else "length",
                logprobs=[-0.01] * tokens if request.logprobs else None,
                prompt_tokens=100,
                cached_tokens=40,
                completion_tokens=tokens,
                cost=self.price * tokens,
            )
        finally:
            self.in_flight -= 1


def pair(**large_kwargs: object) -> tuple[AnsweringBackend, AnsweringBackend]:
    small = AnsweringBackend(
        "small", {"What is 2 + 2?": "4", "What is 3 * 3?": "6", "What is 10 - 7?": "2"}
    )
    large = AnsweringBackend(
        "large",
        {p.question: p.answer for p in PROBLEMS},
        **large_kwargs,  # type: ignore[arg-type]
    )
    return small, large


async def test_every_policy_runs_on_the_same_problems_and_is_summarised(tmp_path: Path) -> None:
    small, large = pair(price=0.5)
    report = await evaluate(
        PROBLEMS,
        ["small-only", "large-only", "specreason"],
        small=small,
        large=large,
        out=tmp_path,
        concurrency=3,
    )
    summary = report.summary
    assert list(summary) == ["small-only", "large-only", "specreason"]
    for figures in summary.values():
        assert set(figures) >= SUMMARY_KEYS
    assert summary["small-only"]["accuracy"] == pytest.approx(1 / 3)
    assert summary["large-only"]["accuracy"] == 1.0
    assert summary["small-only"]["relative_accuracy"] == pytest.approx(1 / 3)
    assert summary["small-only"]["small_token_share"] == 1.0
    assert summary["large-only"]["small_token_share"] == 0.0
    assert summary["small-only"]["lrm_calls"] == 0
    # large-only: one step and one answer step per problem, 60 uncached prompt tokens each
    assert summary["large-only"]["lrm_calls"] == 2
    assert summary["large-only"]["lrm_input_tokens"] == 120
    assert summary["large-only"]["cost"] > 0
    # the judge scores 9: SpecReason keeps every small step, so it scores like the small model
    assert summary["specreason"]["accuracy"] == pytest.approx(1 / 3)
    assert summary["specreason"]["small_step_share"] == 1.0
    assert summary["specreason"]["judge_scores"] == {"9": 6}
    assert summary["specreason"]["judge_accept_rate"] == 1.0
    assert summary["specreason"]["lrm_calls"] == 2  # two judge calls per problem
    assert summary["small-only"]["wrong_answers"]["count"] == 2

    records = read_records(tmp_path)
    assert len(records) == 9 and {r.problem_id for r in records} == {"p1", "p2", "p3"}
    wrong = next(r for r in records if r.policy == "small-only" and r.problem_id == "p2")
    assert (wrong.answer, wrong.predicted, wrong.correct) == ("6", "6", False)
    assert wrong.tokens_by_author["small"] > 0 and wrong.usage["small"]["calls"] == 2
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == json.loads(report.to_json())
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "traces.jsonl").read_text().splitlines()) == 9


async def test_low_judge_scores_hand_steps_to_the_large_model() -> None:
    small, large = pair(score="3")
    report = await evaluate(PROBLEMS, ["specreason"], small=small, large=large)
    figures = report.summary["specreason"]
    assert figures["accuracy"] == 1.0
    assert figures["small_step_share"] == 0.0
    assert figures["triggers"] == {"step_judge": 6}
    assert figures["judge_scores"] == {"3": 6} and figures["judge_accept_rate"] == 0.0
    assert all(r.judge_scores == [3.0, 3.0] for r in report.records)
    assert figures["wrong_answers"]["count"] == 0


async def test_a_rerun_skips_what_is_done(tmp_path: Path) -> None:
    small, large = pair()
    first = await evaluate(
        PROBLEMS[:2], ["small-only", "large-only"], small=small, large=large, out=tmp_path
    )
    assert first.ran == 4
    calls = len(small.requests) + len(large.requests)
    again = await evaluate(
        PROBLEMS, ["small-only", "large-only"], small=small, large=large, out=tmp_path
    )
    assert again.ran == 2  # only p3, for both policies
    assert len(small.requests) + len(large.requests) == calls + 4
    assert again.summary["large-only"]["runs"] == 3
    assert len(read_records(tmp_path)) == 6


async def test_resume_after_an_interrupted_run(tmp_path: Path) -> None:
    small, large = pair()
    small.hang_on = "10 - 7"  # the last problem: interrupt the run there, whatever the load
    policies = ["small-only", "large-only"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: evaluate(PROBLEMS, policies, small=small, large=large, out=tmp_path))
        await small.hanging.wait()
        tg.cancel_scope.cancel()
    small.hang_on = None
    finished = read_records(tmp_path)
    assert 0 < len(finished) < 6
    # a kill during a write leaves half a line: it is ignored
    records = tmp_path / RECORDS_FILE
    records.write_text(records.read_text() + '{"policy": "small-only", "problem_id": "p3", "sam')

    resumed = await evaluate(PROBLEMS, policies, small=small, large=large, out=tmp_path)
    assert resumed.ran == 6 - len(finished)
    keys = [r.key for r in resumed.records]
    assert len(keys) == len(set(keys)) == 6
    assert resumed.summary["large-only"]["accuracy"] == 1.0


async def test_fresh_start_and_changed_settings(tmp_path: Path) -> None:
    small, large = pair()
    await evaluate(PROBLEMS[:1], ["small-only"], small=small, large=large, out=tmp_path)
    with pytest.raises(ConfigError, match="sampling") as info:
        await evaluate(
            PROBLEMS[:1],
            ["small-only"],
            small=small,
            large=large,
            out=tmp_path,
            sampling=Sampling(),
        )
    assert info.value.argument == "out"
    report = await evaluate(
        PROBLEMS[:1],
        ["small-only"],
        small=small,
        large=large,
        out=tmp_path,
        sampling=Sampling(),
        resume=False,
    )
    assert report.ran == 1 and len(read_records(tmp_path)) == 1


async def test_errors_are_recorded_and_retried(tmp_path: Path) -> None:
    small, large = pair(fail_on="3 * 3")
    report = await evaluate(PROBLEMS, ["large-only"], small=small, large=large, out=tmp_path)
    figures = report.summary["large-only"]
    assert figures["errors"] == 1 and figures["runs"] == 2 and figures["accuracy"] == 1.0
    failed = next(r for r in report.records if r.error)
    assert failed.problem_id == "p2" and "server error" in failed.error

    large.fail_on = None
    retried = await evaluate(PROBLEMS, ["large-only"], small=small, large=large, out=tmp_path)
    assert retried.ran == 1
    assert retried.summary["large-only"]["errors"] == 0
    assert retried.summary["large-only"]["runs"] == 3


async def test_a_policy_given_as_module_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_policies.py").write_text(
        textwrap.dedent(
            """
            from collab_agent.policies import Policy, StrategicPriming

            def large_first(steps=1):
                return Policy(triggers=(StrategicPriming(steps=steps),), name="large-first")

            def unnamed():
                return Policy(triggers=())
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    small, large = pair()
    report = await evaluate(
        PROBLEMS, ["my_policies:large_first", "my_policies:unnamed"], small=small, large=large
    )
    assert list(report.summary) == ["large-first", "my_policies:unnamed"]
    # the large model writes the first step, the small one the answer step
    assert report.summary["large-first"]["triggers"] == {"strategic_priming": 3}
    assert report.summary["large-first"]["small_step_share"] == 0.0
    assert report.summary["large-first"]["accuracy"] == pytest.approx(1 / 3)
    sys.modules.pop("my_policies", None)


async def test_unknown_policy_names_the_argument() -> None:
    small, large = pair()
    with pytest.raises(ConfigError) as info:
        await evaluate(PROBLEMS, ["nope"], small=small, large=large)
    assert info.value.argument == "policy"


async def test_samples_use_consecutive_seeds_and_concurrency_is_bounded() -> None:
    small, large = pair(delay=0.02)
    report = await evaluate(
        PROBLEMS,
        ["large-only"],
        small=small,
        large=large,
        samples=2,
        seed=10,
        sampling=Sampling(temperature=0.6, top_p=0.95),
        concurrency=2,
    )
    assert report.summary["large-only"]["runs"] == 6
    assert report.summary["large-only"]["problems"] == 3
    assert {r.sampling.seed for r in large.requests} == {10, 11}
    assert large.max_in_flight == 2


async def test_timeout_is_recorded_as_an_error() -> None:
    small, large = pair(delay=1.0)
    report = await evaluate(
        PROBLEMS[:1], ["large-only"], small=small, large=large, problem_timeout_s=0.05
    )
    assert report.summary["large-only"]["errors"] == 1
    assert "timeout" in (report.records[0].error or "")


async def test_evaluate_on_tiny_models(tiny_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real local backend under the runner: random weights answer wrongly, but every record
    carries the usage of the model that ran."""
    from collab_agent.backends.local import TransformersBackend

    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    report = await evaluate(
        PROBLEMS[:2],
        ["small-only", "large-only", "trigreason"],
        small=small,
        large=large,
        sampling=GREEDY,
        budget=16,
        max_steps=2,
        step_max_tokens=8,
        answer_max_tokens=4,
        concurrency=2,
        out=tmp_path,
    )
    assert [r.error for r in report.records] == [None] * 6
    assert report.summary["small-only"]["lrm_calls"] == 0
    assert report.summary["large-only"]["srm_calls"] == 0
    assert report.summary["large-only"]["lrm_output_tokens"] > 0
    trig = report.summary["trigreason"]
    assert trig["triggers"].get("strategic_priming") == 2  # priming: the large model opens


def eval_app() -> Any:
    """A typer app holding only the ``eval`` command, as ``collab-agent`` registers it."""
    import typer

    from collab_agent.evaluation.cli import register

    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """collab-agent"""

    register(app)
    return app


def one_problem_file(folder: Path) -> Path:
    data = folder / "d.jsonl"
    data.write_text(json.dumps({"id": 1, "question": "What is 2 + 2?", "answer": "4"}) + "\n")
    return data


def test_eval_command_prints_the_summary_as_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    app, data = eval_app(), one_problem_file(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data", str(data),
            "--models", "tiny",
            "--policy", "small-only,large-only",
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
    assert set(summary) == {"small-only", "large-only"}
    assert set(summary["large-only"]) >= SUMMARY_KEYS
    assert (tmp_path / "out" / RECORDS_FILE).exists()


async def test_an_interrupted_run_is_summarised_on_common_problems(tmp_path: Path) -> None:
    from collab_agent.evaluation.report import summarise_folder

    small, large = pair()
    await evaluate(PROBLEMS, ["small-only"], small=small, large=large, out=tmp_path)
    await evaluate(
        PROBLEMS[:1], ["small-only", "large-only"], small=small, large=large, out=tmp_path
    )
    summary = summarise_folder(tmp_path)
    assert summary["small-only"]["runs"] == summary["large-only"]["runs"] == 1
    assert summarise_folder(tmp_path, complete_only=False)["small-only"]["runs"] == 3
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["large-only"]["runs"] == 1


async def test_a_summary_limited_to_named_policies_counts_their_common_problems(
    tmp_path: Path,
) -> None:
    from collab_agent.evaluation.report import summarise_folder

    small, large = pair()
    await evaluate(PROBLEMS, ["small-only", "large-only"], small=small, large=large, out=tmp_path)
    await evaluate(PROBLEMS[:1], ["trigreason"], small=small, large=large, out=tmp_path)
    every = summarise_folder(tmp_path)
    assert every["small-only"]["runs"] == 1  # trigreason answered one problem only
    named = summarise_folder(tmp_path, policies=["small-only", "large-only"])
    assert set(named) == {"small-only", "large-only"} and named["small-only"]["runs"] == 3
    with pytest.raises(ConfigError, match="specreason"):
        summarise_folder(tmp_path, policies=["small-only", "specreason"])


def run(policy: str, problem: str, correct: bool, tokens: int) -> ProblemRecord:
    """A single-model run's record: ``tokens`` written by that model."""
    author = "small" if policy == "small-only" else "large"
    return ProblemRecord(
        policy, problem, 0, "1", correct=correct, tokens_by_author={author: tokens}
    )


def test_oracle_router_sends_each_problem_to_the_cheapest_model_that_does_not_lose() -> None:
    from collab_agent.evaluation.report import oracle_router

    records = [
        run("small-only", "both", True, 10), run("large-only", "both", True, 100),
        run("small-only", "large", False, 20), run("large-only", "large", True, 200),
        run("small-only", "none", False, 30), run("large-only", "none", False, 300),
        run("small-only", "alone", True, 40),  # no large-only run: not counted
    ]  # fmt: skip
    bound = oracle_router(records)
    assert bound is not None and bound["problems"] == 3
    assert bound["accuracy"] == pytest.approx(2 / 3)  # 'none' is lost by both
    assert bound["small_token_share"] == pytest.approx((10 + 30) / (10 + 30 + 200))
    assert (bound["both_right"], bound["only_small_right"], bound["only_large_right"]) == (1, 0, 1)
    assert oracle_router(records[:1]) is None


def test_cascade_router_re_solves_the_least_confident_problems_with_the_large_model() -> None:
    from collab_agent.evaluation.report import cascade_router, least_likely_token_nll
    from collab_agent.trace import Step, Trace

    def trace(worst_logprob: float) -> Trace:
        steps = [
            Step(index=0, author="small", text="a", tokens=2, logprobs=[-0.1, worst_logprob]),
            Step(index=1, author="small", text="b", tokens=1, logprobs=[-0.2]),
        ]
        return Trace(conversation_id="c", policy="small-only", steps=steps)

    # the small model is unsure exactly where it is wrong
    records = [
        run("small-only", "sure", True, 10), run("large-only", "sure", True, 100),
        run("small-only", "unsure", False, 20), run("large-only", "unsure", True, 200),
        run("small-only", "lost", False, 30), run("large-only", "lost", False, 300),
    ]  # fmt: skip
    traces = {
        ("small-only", "sure", 0): trace(-0.5),
        ("small-only", "unsure", 0): trace(-3.0),
        ("small-only", "lost", 0): trace(-2.0),
    }
    assert least_likely_token_nll(traces[("small-only", "unsure", 0)]) == 3.0
    none, one, all_ = cascade_router(records, traces, escalate=(0.0, 1 / 3, 1.0))
    assert none["accuracy"] == pytest.approx(1 / 3) and none["large_token_ratio"] == 0
    assert one["accuracy"] == pytest.approx(2 / 3) and one["threshold_nll"] == 3.0
    assert one["small_token_share"] == pytest.approx(60 / (60 + 200))
    assert one["large_token_ratio"] == pytest.approx(200 / 600)
    assert all_["accuracy"] == pytest.approx(2 / 3) and all_["large_token_ratio"] == 1.0
    assert cascade_router(records, {}) == []  # no traces, no cascade


# ------------------------------------------------------------------------- the loop, reused
def _run_jobs_setup(
    small: AnsweringBackend, large: AnsweringBackend
) -> tuple[list[Any], Any, dict[str, Any]]:
    from collab_agent.evaluation.runner import Job
    from collab_agent.policies import SmallOnly
    from collab_agent.reasoner import Reasoner

    policy = SmallOnly()
    jobs = [Job(policy, p) for p in PROBLEMS]
    outcomes: dict[str, Any] = {}

    def reasoner_for(policy: Any, sample: int) -> Reasoner:
        return Reasoner(small, large, policy, sampling=GREEDY)

    return jobs, reasoner_for, outcomes


async def test_run_jobs_hands_a_failed_run_to_done_and_answers_the_rest() -> None:
    from collab_agent.evaluation.runner import run_jobs

    small, large = pair()
    small.fail_on, small.delay = "3 * 3", 0.01
    jobs, reasoner_for, outcomes = _run_jobs_setup(small, large)

    def done(job: Any, outcome: Any, seconds: float) -> None:
        outcomes[job.problem.id] = (job.conversation_id, outcome, seconds)

    await run_jobs(jobs, reasoner_for, done, concurrency=2)
    assert sorted(outcomes) == ["p1", "p2", "p3"]
    assert isinstance(outcomes["p2"][1], BackendError)
    for key in ("p1", "p3"):
        conversation_id, trace, seconds = outcomes[key]
        assert conversation_id == f"eval:small-only:{key}:0" == trace.conversation_id
        assert trace.answer and seconds > 0
    assert small.max_in_flight == 2


async def test_run_jobs_stops_at_a_failure_unless_errors_are_kept() -> None:
    from collab_agent.evaluation.runner import run_jobs

    small, large = pair()
    small.fail_on = "3 * 3"
    jobs, reasoner_for, outcomes = _run_jobs_setup(small, large)

    def done(job: Any, outcome: Any, seconds: float) -> None:
        outcomes[job.problem.id] = outcome

    with pytest.raises(ExceptionGroup) as info:  # raised out of the task group
        await run_jobs(jobs, reasoner_for, done, keep_errors=False)
    assert info.group_contains(BackendError)
    assert not any(isinstance(o, Exception) for o in outcomes.values())

    def misconfigured(policy: Any, sample: int) -> Any:
        raise ConfigError("policy", "cannot run")

    with pytest.raises(ExceptionGroup) as info:
        await run_jobs(jobs, misconfigured, done)  # a ConfigError stops even with kept errors
    assert info.group_contains(ConfigError)
