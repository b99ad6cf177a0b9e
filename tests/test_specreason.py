"""SpecReason (Pan et al. 2025): the large model scores each small-model step 0-9 and rewrites
the steps scored below the threshold; its judge calls are counted in the trace."""

from __future__ import annotations

import math

import pytest

from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.errors import ConfigError
from collab_agent.policies.specreason import (
    JUDGE_INSTRUCTION,
    JUDGE_LEAD,
    SpecReason,
    StepJudge,
    expected_score,
    greedy_score,
)
from collab_agent.reasoner import Reasoner
from collab_agent.testing import ScriptedBackend

QUESTION = [
    {"role": "user", "content": "Janet has 16 eggs, eats 3, bakes 4, sells the rest at $2."}
]


async def test_steps_scored_below_threshold_are_rewritten_by_the_large_model() -> None:
    small = ScriptedBackend(["16 - 3 - 4 = 9 eggs.", "9 * 2 = 20 dollars.", "Final answer: 18"])
    large = ScriptedBackend(["9", "2", "9 * 2 = 18 dollars.", "8"])
    trace = await Reasoner(small, large, SpecReason()).run(QUESTION)

    assert [(s.author, s.trigger) for s in trace.steps] == [
        ("small", None),
        ("large", "step_judge"),
    ]
    assert trace.steps[1].text == "9 * 2 = 18 dollars."
    assert trace.steps[1].rejected_text == "9 * 2 = 20 dollars."
    assert trace.answer == "18" and trace.answer_author == "small"
    assert trace.policy == "specreason"
    assert trace.trigger_counts == {"step_judge": 1}
    assert "score 2.00 < 7" in trace.firings[0].detail
    # three judge calls and one rewrite, all counted against the large model
    assert trace.usage["large"].calls == 4
    assert trace.usage["small"].calls == 3


async def test_judge_request_follows_the_specreason_prompt() -> None:
    small = ScriptedBackend(["First step.", "Final answer: 1"])
    large = ScriptedBackend(["9", "9"])
    await Reasoner(small, large, SpecReason()).run(QUESTION)

    judge: GenerateRequest = large.requests[1]
    assert judge.purpose == "judge"
    assert judge.max_tokens == 1 and judge.logprobs and judge.stop == ()
    assert judge.sampling.temperature == 0
    assert judge.reasoning == JUDGE_LEAD
    assert judge.messages[-1] == {"role": "user", "content": JUDGE_INSTRUCTION}
    assert judge.messages[-2] == {
        "role": "assistant",
        "content": "First step.\n\nFinal answer: 1\n\n",
    }
    assert judge.messages[1]["content"] == QUESTION[0]["content"]
    assert judge.conversation_id == large.requests[0].conversation_id


async def test_a_judge_that_writes_no_digit_rejects_the_step_by_default() -> None:
    small = ScriptedBackend(["A step.", "Final answer: 1"])
    large = ScriptedBackend(["great", "A better step.", "9"])
    trace = await Reasoner(small, large, SpecReason()).run(QUESTION)
    assert trace.steps[0].author == "large"
    assert "no score" in trace.firings[0].detail

    small = ScriptedBackend(["A step.", "Final answer: 1"])
    large = ScriptedBackend(["great", "9"])
    trace = await Reasoner(small, large, SpecReason(reject_unscored=False)).run(QUESTION)
    assert trace.steps[0].author == "small"


async def test_threshold_zero_keeps_every_small_step() -> None:
    small = ScriptedBackend(["a", "b", "Final answer: 2"])
    large = ScriptedBackend(["0", "1", "0"])
    trace = await Reasoner(small, large, SpecReason(threshold=0)).run(QUESTION)
    assert trace.small_step_share == 1.0 and not trace.firings


class TopLogprobsBackend:
    """A judge that returns one token with top logprobs, as a backend supporting them would."""

    name = "judge"

    def __init__(self, top: dict[str, float]) -> None:
        self.top = top
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> Generation:
        self.requests.append(request)
        if request.purpose != "judge":
            text = "Final answer: 1" if request.reasoning else "Rewritten."
            return Generation(text=text, stop_reason="step", completion_tokens=1)
        best = max(self.top, key=lambda t: self.top[t])
        return Generation(
            text=best,
            stop_reason="length",
            logprobs=[self.top[best]],
            top_logprobs=[dict(self.top)] if request.top_logprobs else None,
            completion_tokens=1,
        )


async def test_expected_score_rejects_a_step_the_greedy_score_accepts() -> None:
    # the judge's top token is "7", but "1" holds almost as much mass: expected ~4.3
    top = {"7": math.log(0.5), "1": math.log(0.45), " the": math.log(0.05)}
    for method, author in (("greedy", "small"), ("expected", "large")):
        small = ScriptedBackend(["A step.", "Final answer: 1"])
        large = TopLogprobsBackend(top)
        trace = await Reasoner(small, large, SpecReason(score=method)).run(QUESTION)  # type: ignore[arg-type]
        assert trace.steps[0].author == author, method
        judge_requests = [r for r in large.requests if r.purpose == "judge"]
        assert judge_requests
        assert {r.top_logprobs for r in judge_requests} == {10 if method == "expected" else 0}


def test_score_parsing() -> None:
    assert greedy_score("9") == 9 and greedy_score(" 7\n") == 7
    assert greedy_score("x") is None and greedy_score("") is None and greedy_score("٣") is None
    assert expected_score({"9": 0.0}) == 9
    assert expected_score({"9": math.log(0.25), "5": math.log(0.25), "a": 0.0}) == 7
    assert expected_score({"a": 0.0}) is None


def test_judge_counts_its_scores() -> None:
    judge = StepJudge()
    assert judge.name == "step_judge" and judge.threshold == 7


async def test_score_counts_record_every_judgement() -> None:
    policy = SpecReason()
    small = ScriptedBackend(["a", "b", "Final answer: 2"])
    large = ScriptedBackend(["9", "9", "4", "Final answer: 2"])
    await Reasoner(small, large, policy).run(QUESTION)
    judge = policy.triggers[0]
    assert isinstance(judge, StepJudge)
    assert dict(judge.score_counts) == {9.0: 2, 4.0: 1}
    (conversation,) = judge.scores
    assert judge.pop_scores(conversation) == [9.0, 9.0, 4.0]
    assert judge.scores == {} and judge.pop_scores(conversation) == []


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"threshold": 10}, "threshold"),
        ({"score": "mean"}, "score"),
        ({"top_logprobs": 0}, "top_logprobs"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        SpecReason(**kwargs)  # type: ignore[arg-type]
    assert info.value.argument == argument


async def test_judge_outside_a_reasoner_is_a_clear_error() -> None:
    from collab_agent.trace import Step, Trace

    with pytest.raises(ConfigError, match="StepContext"):
        await StepJudge().after_step(Trace("c"), Step(0, "small", "x"))


async def test_specreason_on_tiny_models(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    """Real code path: a random-weight judge rarely writes a digit, so steps get rewritten,
    and every judge call is one generated token counted against the large model."""
    from collab_agent.backends.base import GREEDY
    from collab_agent.backends.local import TransformersBackend

    small = TransformersBackend(tiny_pair.small, tiny_pair.tokenizer, name="tiny-small")
    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    policy = SpecReason()
    reasoner = Reasoner(
        small, large, policy, sampling=GREEDY, max_steps=2, step_max_tokens=6, answer_max_tokens=4
    )
    trace = await reasoner.run(QUESTION)
    judge = policy.triggers[0]
    assert isinstance(judge, StepJudge)
    judged = sum(judge.score_counts.values())
    small_steps = trace.usage["small"].calls - (1 if trace.answer_author == "small" else 0)
    assert judged == small_steps >= 1
    assert trace.usage["large"].calls >= judged
    assert len(trace.firings) == sum(s.rejected_text is not None for s in trace.steps)


async def test_expected_score_on_a_real_judge_reads_its_top_logprobs(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    """A real model's judge token: the expected score is the digit mean over its top logprobs."""
    from collab_agent.backends.local import TransformersBackend

    large = TransformersBackend(tiny_pair.large, tiny_pair.tokenizer, name="tiny-large")
    digits = {str(d): float(-d) for d in range(10)}  # what a judge with digits on top would give
    judge = StepJudge(score="expected", top_logprobs=20)
    request = GenerateRequest("j", QUESTION, max_tokens=1, stop=(), top_logprobs=20)
    generation = await large.generate(request)
    assert generation.top_logprobs is not None and len(generation.top_logprobs) == 1
    top = generation.top_logprobs[0]
    assert 1 <= len(top) <= 20 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-4
    assert judge.score_of(generation) == (expected_score(top) or greedy_score(generation.text))
    assert judge.score_of(Generation("3", "length", top_logprobs=[digits])) == pytest.approx(
        expected_score(digits)
    )
