"""The trace is plain data; a trigger hook that calls a model declares a ``context`` parameter and
gets the running collaboration's `StepContext` from the reasoner."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest

from collab_agent.policies import BaseTrigger, Policy, Reject, StepContext, TrigReason
from collab_agent.reasoner import Reasoner
from collab_agent.testing import ScriptedBackend
from collab_agent.trace import Step, Trace

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


@dataclass
class AskLarge(BaseTrigger):
    """Asks the large model whether each small step is right; rejects it on "no"."""

    name: str = "ask_large"
    seen: tuple[str, ...] = ()

    async def after_step(
        self, trace: Trace, step: Step, context: StepContext | None = None
    ) -> Reject | None:
        assert context is not None and context.trace is trace
        self.seen += (context.prefix(then=step),)
        request = context.request(context.prefix(then=step), purpose="ask", max_tokens=2)
        verdict = await context.generate("large", request)
        return Reject(self.name) if verdict.text.strip() == "no" else None


async def test_a_hook_that_declares_context_calls_the_model_and_the_call_is_counted() -> None:
    small = ScriptedBackend(["Three and four.", "It is eight.", "Final answer: 7"])
    large = ScriptedBackend(["yes", "no", "It is seven.", "yes"])
    trigger = AskLarge()
    trace = await Reasoner(small, large, Policy([trigger], name="ask")).run(QUESTION)

    assert [(s.author, s.text) for s in trace.steps] == [
        ("small", "Three and four."),
        ("large", "It is seven."),
    ]
    assert trace.steps[1].rejected_text == "It is eight."
    assert [r.purpose for r in large.requests[:2]] == ["ask", "ask"]
    assert large.requests[1].reasoning == "Three and four.\n\nIt is eight.\n\n"
    assert trigger.seen[0] == "Three and four.\n\n"
    assert trace.usage["large"].calls == 4  # three questions and one rewrite


async def test_hooks_without_context_keep_working_beside_one_with_it() -> None:
    small = ScriptedBackend(["Three and four.", "Final answer: 7"])
    large = ScriptedBackend(["First, add.", "yes", "yes"])
    policy = Policy([*TrigReason(priming_steps=1).triggers, AskLarge()], name="mixed")
    trace = await Reasoner(small, large, policy).run(QUESTION)
    assert [s.author for s in trace.steps] == ["large", "small"]
    assert trace.answer == "7"


async def test_the_trace_of_a_run_is_plain_data() -> None:
    small = ScriptedBackend(["Three and four.", "Final answer: 7"])
    large = ScriptedBackend(["yes", "yes"])
    trace = await Reasoner(small, large, Policy([AskLarge()])).run(QUESTION)

    assert pickle.loads(pickle.dumps(trace)) == trace
    assert copy.deepcopy(trace) == trace
    assert Trace.from_dict(trace.to_dict()) == trace
    assert "session" not in trace.to_dict()
    with pytest.warns(DeprecationWarning, match="StepContext"):
        assert trace.session is None
