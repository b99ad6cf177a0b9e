"""The step loop, driven by ScriptedBackend: each TrigReason trigger, budgets, cancellation."""

from __future__ import annotations

import math

import anyio
import pytest

from collab_agent import ConfigError, InvalidMessagesError
from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.errors import BackendError, BackendUnavailableError
from collab_agent.policies import (
    BaseTrigger,
    CognitiveOffload,
    Handoff,
    InterventionRequest,
    LargeOnly,
    Policy,
    Reject,
    SmallOnly,
    StrategicPriming,
    TrigReason,
)
from collab_agent.prompting import THINK
from collab_agent.reasoner import Reasoner
from collab_agent.testing import ScriptedBackend, ScriptedStep

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]
CONFIDENT = math.log(0.99)  # p = 0.99 > 1/1.05
UNSURE = math.log(0.5)


def overconfident(text: str, share: float = 0.9, n: int = 10) -> tuple[str, list[float]]:
    confident = round(share * n)
    return text, [CONFIDENT] * confident + [UNSURE] * (n - confident)


async def test_priming_hands_the_first_n_steps_to_the_large_model() -> None:
    small = ScriptedBackend(["s3", "s4", "Final answer: 7"])
    large = ScriptedBackend(["l0", "l1", "l2"])
    trace = await Reasoner(small, large, TrigReason(priming_steps=3)).run(QUESTION)
    assert [(s.author, s.text) for s in trace.steps] == [
        ("large", "l0"),
        ("large", "l1"),
        ("large", "l2"),
        ("small", "s3"),
        ("small", "s4"),
    ]
    assert all(s.trigger == "strategic_priming" for s in trace.steps[:3])
    assert trace.trigger_counts == {"strategic_priming": 1}
    assert trace.answer == "7" and trace.answer_author == "small"
    assert large.calls == 3 and small.calls == 3


async def test_overconfident_small_step_is_rewritten_by_the_large_model_from_the_same_prefix() -> (
    None
):
    small = ScriptedBackend(["first step", overconfident("sure step", 0.9), "Final answer: 7"])
    large = ScriptedBackend(["careful step"])
    policy = TrigReason(priming_steps=0, rho=0.85)
    trace = await Reasoner(small, large, policy).run(QUESTION)
    assert [(s.author, s.text) for s in trace.steps] == [
        ("small", "first step"),
        ("large", "careful step"),
    ]
    rewritten = trace.steps[1]
    assert rewritten.trigger == "cognitive_offload"
    assert rewritten.rejected_text == "sure step"
    assert rewritten.rejected_tokens == 10
    # The large model continued exactly the prefix the rejected step had continued.
    assert large.requests[0].reasoning == small.requests[1].reasoning == "first step\n\n"
    # The rejected text is gone from what follows.
    assert small.requests[2].reasoning == "first step\n\ncareful step\n\n"
    assert trace.firings[0].action == "reject"


async def test_a_step_at_the_confidence_share_limit_is_kept() -> None:
    small = ScriptedBackend([overconfident("fine step", 0.8), "Final answer: 7"])
    large = ScriptedBackend([])
    trace = await Reasoner(small, large, TrigReason(priming_steps=0, rho=0.85)).run(QUESTION)
    assert [s.author for s in trace.steps] == ["small"]
    assert trace.trigger_counts == {}


async def test_hesitation_in_k_consecutive_steps_hands_m_steps_to_the_large_model() -> None:
    small = ScriptedBackend(["Wait, is that right?", "Hmm, maybe not.", "s5", "Final answer: 7"])
    large = ScriptedBackend(["l2", "l3"])
    policy = TrigReason(priming_steps=0, consecutive=2, intervention_steps=2)
    trace = await Reasoner(small, large, policy).run(QUESTION)
    assert [(s.author, s.trigger) for s in trace.steps] == [
        ("small", None),
        ("small", None),
        ("large", "intervention_request"),
        ("large", "intervention_request"),
        ("small", None),
    ]
    assert trace.trigger_counts == {"intervention_request": 1}


async def test_hesitation_words_match_whole_words_only() -> None:
    trigger = InterventionRequest()
    assert trigger.hesitates("But WAIT, 3 + 4 is 7")
    assert trigger.hesitates("Alternatively we add.")
    assert not trigger.hesitates("The waiter brings 7 plates")
    assert not trigger.hesitates("hmmm")  # not the word 'hmm'


async def test_a_step_repeated_verbatim_is_a_loop_that_calls_the_large_model() -> None:
    small = ScriptedBackend(["We add 3 and 4.", "We add  3 and 4.", "Final answer: 7"])
    large = ScriptedBackend(["3 + 4 = 7."])
    trace = await Reasoner(small, large, TrigReason(priming_steps=0)).run(QUESTION)
    assert [s.author for s in trace.steps] == ["small", "small", "large"]
    assert trace.firings[0].detail == "step repeated verbatim"


CUSTOM_TRIGGER_SOURCE = '''
class LongStep(BaseTrigger):
    """Reject small-model steps longer than max_words words."""

    name = "long_step"

    def __init__(self, max_words: int = 5) -> None:
        self.max_words = max_words

    async def after_step(self, trace, step):
        if len(step.text.split()) > self.max_words:
            return Reject(self.name, detail=f"{len(step.text.split())} words")
        return None
'''


async def test_a_custom_trigger_written_in_a_few_lines_works() -> None:
    namespace: dict[str, object] = {"BaseTrigger": BaseTrigger, "Reject": Reject}
    exec(CUSTOM_TRIGGER_SOURCE, namespace)
    assert len(CUSTOM_TRIGGER_SOURCE.strip().splitlines()) < 30
    long_step = namespace["LongStep"]()  # type: ignore[operator]
    small = ScriptedBackend(["short", "this step is far too long to keep", "Final answer: 7"])
    large = ScriptedBackend(["concise"])
    trace = await Reasoner(small, large, Policy([long_step], name="custom")).run(QUESTION)
    assert [(s.author, s.text, s.trigger) for s in trace.steps] == [
        ("small", "short", None),
        ("large", "concise", "long_step"),
    ]
    assert trace.steps[1].rejected_text == "this step is far too long to keep"
    assert trace.policy == "custom"


async def test_first_trigger_that_fires_wins_and_is_recorded() -> None:
    class Always(BaseTrigger):
        def __init__(self, name: str) -> None:
            self.name = name

        async def before_step(self, trace):  # type: ignore[no-untyped-def]
            return Handoff(self.name) if len(trace.steps) == 0 else None

    small = ScriptedBackend(["Final answer: 7"])
    large = ScriptedBackend(["l0"])
    trace = await Reasoner(small, large, Policy([Always("first"), Always("second")])).run(QUESTION)
    assert trace.steps[0].trigger == "first"
    assert trace.trigger_counts == {"first": 1}


async def test_token_budget_stops_reasoning_and_the_large_model_answers() -> None:
    small = ScriptedBackend(["one two three", "four five six", "never used"])
    large = ScriptedBackend([ScriptedStep(" 7", stop_reason="eos")])
    reasoner = Reasoner(small, large, TrigReason(priming_steps=0, answer_by="large"), budget=6)
    trace = await reasoner.run(QUESTION)
    assert trace.stop_reason == "budget"
    assert trace.reasoning_tokens == 6
    assert trace.answer == "7" and trace.answer_author == "large"
    assert large.requests[-1].purpose == "answer"
    assert large.requests[-1].reasoning.endswith("four five six\n\nFinal answer:")
    # Each step asked for no more tokens than the budget had left.
    assert [r.max_tokens for r in small.requests] == [6, 3]


async def test_step_cap_stops_reasoning_with_the_reason_recorded() -> None:
    small = ScriptedBackend(["a", "b", "c", ScriptedStep(" 7", stop_reason="eos")])
    trace = await Reasoner(small, ScriptedBackend([]), SmallOnly(), max_steps=3).run(QUESTION)
    assert trace.stop_reason == "max_steps"
    assert len(trace.steps) == 3
    assert trace.answer == "7"


async def test_large_only_never_calls_the_small_model() -> None:
    small = ScriptedBackend([])
    large = ScriptedBackend(["l0", "Final answer: 7"])
    trace = await Reasoner(small, large, LargeOnly()).run(QUESTION)
    assert small.calls == 0
    assert trace.small_token_share == 0.0
    assert trace.answer == "7"


async def test_think_format_ends_reasoning_at_close_tag_and_continues_the_answer() -> None:
    small = ScriptedBackend(
        ["Add them.", "3 + 4 = 7.\n</think>", ScriptedStep("The answer is 7.", stop_reason="eos")]
    )
    trace = await Reasoner(small, ScriptedBackend([]), SmallOnly(), format=THINK).run(QUESTION)
    assert [s.text for s in trace.steps] == ["Add them.", "3 + 4 = 7."]
    assert trace.answer == "The answer is 7."
    assert small.requests[0].reasoning == "<think>\n"
    assert small.requests[-1].reasoning.startswith("<think>\nAdd them.\n\n3 + 4 = 7.\n</think>")


async def test_events_stream_one_per_step_then_the_answer() -> None:
    small = ScriptedBackend(["s0", "s1", "Final answer: 7"])
    reasoner = Reasoner(small, ScriptedBackend(["l"]), TrigReason(priming_steps=1))
    kinds = [
        (e.kind, getattr(e, "step", None) and e.step.author)
        async for e in reasoner.stream(QUESTION)
    ]
    assert kinds == [("step", "large"), ("step", "small"), ("step", "small"), ("answer", None)]


async def test_trace_round_trips_through_json() -> None:
    import json

    from collab_agent.trace import Trace

    small = ScriptedBackend(["s0", overconfident("s1"), "Final answer: 7"])
    trace = await Reasoner(small, ScriptedBackend(["l0", "l1"]), TrigReason(priming_steps=1)).run(
        QUESTION
    )
    again = Trace.from_dict(json.loads(trace.to_json()))
    assert again == trace
    assert again.small_token_share == trace.small_token_share
    assert trace.usage["small"].calls == 3 and trace.usage["large"].calls == 2


async def test_caches_are_released_when_the_conversation_ends() -> None:
    small, large = ScriptedBackend(["Final answer: 7"]), ScriptedBackend([])
    trace = await Reasoner(small, large, SmallOnly()).run(QUESTION, conversation_id="c1")
    assert small.released == ["c1"] and large.released == ["c1"]
    assert trace.conversation_id == "c1"


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}], "messages[-1].role"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": ["a", "b"]}], "messages[0].content"),
        (["just a string"], "messages[0]"),
    ],
)
async def test_bad_conversations_raise_before_any_model_runs(messages: list, fragment: str) -> None:
    small = ScriptedBackend(["never"])
    with pytest.raises(
        InvalidMessagesError, match=fragment.replace("[", r"\[").replace("]", r"\]")
    ):
        await Reasoner(small, small, SmallOnly()).run(messages)
    assert small.calls == 0


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: CognitiveOffload(rho=0.0), "rho"),
        (lambda: CognitiveOffload(rho=1.2), "rho"),
        (lambda: CognitiveOffload(tau=0.99), "tau"),
        (lambda: StrategicPriming(steps=-1), "steps"),
        (lambda: InterventionRequest(consecutive=0), "consecutive"),
        (lambda: Reasoner(ScriptedBackend([]), ScriptedBackend([]), budget=0), "budget"),
        (lambda: Reasoner(ScriptedBackend([]), ScriptedBackend([]), budget=-5), "budget"),
        (lambda: Reasoner(ScriptedBackend([]), ScriptedBackend([]), max_steps=0), "max_steps"),
        (lambda: Reasoner(ScriptedBackend([]), "not a backend"), "large"),  # type: ignore[arg-type]
        (lambda: Policy([object()]), "triggers[0]"),  # type: ignore[list-item]
        (lambda: GenerateRequest("c", [], max_tokens=1), "messages"),
    ],
)
def test_bad_arguments_raise_a_config_error_naming_the_argument(build, argument: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        build()
    assert caught.value.argument == argument
    assert isinstance(caught.value, ValueError)


def test_rho_one_disables_cognitive_offload() -> None:
    trigger = CognitiveOffload(rho=1.0)
    from collab_agent.trace import Step, Trace

    step = Step(0, "small", "x", tokens=3, logprobs=[0.0, 0.0, 0.0])
    assert anyio.run(trigger.after_step, Trace("c"), step) is None


# ---------------------------------------------------------------------- faults and cancellation
class FailingBackend(ScriptedBackend):
    def __init__(self, error: Exception, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__([], **kwargs)
        self.error = error

    async def generate(self, request: GenerateRequest) -> Generation:
        self.requests.append(request)
        await anyio.sleep(0.01)
        raise self.error


async def test_a_backend_that_raises_mid_step_propagates_and_leaves_nothing_running() -> None:
    small = ScriptedBackend(["s0"], delay=0.0)
    large = FailingBackend(BackendError("boom"))
    policy = TrigReason(priming_steps=0, rho=0.5)
    small.script[0] = ScriptedStep("s0", [CONFIDENT] * 3)
    with pytest.raises(BackendError, match="boom"):
        await Reasoner(small, large, policy).run(QUESTION, conversation_id="c")
    assert small.released == ["c"] and large.released == ["c"]


async def test_degrade_mode_lets_the_small_model_write_when_the_large_one_is_unreachable() -> None:
    small = ScriptedBackend(["s0", "Final answer: 7"])
    large = FailingBackend(BackendUnavailableError("large unreachable"))
    reasoner = Reasoner(small, large, TrigReason(priming_steps=1), on_large_unavailable="degrade")
    trace = await reasoner.run(QUESTION)
    assert trace.steps[0].author == "small" and trace.steps[0].degraded
    assert trace.degraded_steps == 1
    assert trace.answer == "7"
    with pytest.raises(BackendUnavailableError):
        await Reasoner(ScriptedBackend(["s0"]), large, TrigReason(priming_steps=1)).run(QUESTION)


async def test_cancelling_the_consumer_cancels_the_in_flight_generation() -> None:
    small = ScriptedBackend(["s0", "s1", "Final answer: 7"], delay=30.0)
    reasoner = Reasoner(small, ScriptedBackend([]), SmallOnly())
    with anyio.move_on_after(0.2) as scope:
        await reasoner.run(QUESTION, conversation_id="c")
    assert scope.cancelled_caught
    assert small.cancelled == 1
    assert small.released == ["c"]


async def test_closing_the_stream_early_stops_generating_and_frees_caches() -> None:
    small = ScriptedBackend(["s0", "s1", "s2", "Final answer: 7"])
    stream = Reasoner(small, ScriptedBackend([]), SmallOnly()).stream(QUESTION, conversation_id="c")
    first = await stream.__anext__()
    await stream.aclose()
    assert first.kind == "step"
    assert small.calls == 1
    assert small.released == ["c"]


async def test_an_answer_cut_off_by_the_step_limit_is_written_whole() -> None:
    small = ScriptedBackend(
        [
            ScriptedStep('So we call it.\nFinal answer: {"na', stop_reason="length"),
            ScriptedStep(' {"name": "x"}', stop_reason="eos"),
        ]
    )
    trace = await Reasoner(small, ScriptedBackend([]), SmallOnly()).run(QUESTION)
    assert trace.answer == '{"name": "x"}'
    assert small.requests[-1].reasoning == "So we call it.\n\nFinal answer:"
