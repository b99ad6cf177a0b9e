"""Each model call of a collaboration is a child run in LangChain's callbacks, so a tracer
(LangSmith, Langfuse, ...) shows who wrote what."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.tracers.base import AsyncBaseTracer, BaseTracer
from langchain_core.tracers.schemas import Run

from collab_agent import CollabChatModel, ScriptedBackend, TrigReason
from collab_agent.errors import BackendError


class Capture(BaseTracer):
    """A real tracer: keeps each finished root run with its child runs."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        self.runs.append(run)


class AsyncCapture(AsyncBaseTracer):
    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run] = []

    async def _persist_run(self, run: Run) -> None:
        self.runs.append(run)


def model() -> CollabChatModel:
    small = ScriptedBackend(["Then 6 * 7.", "That is 42.", "Final answer: 42"], name="srm")
    large = ScriptedBackend(["Multiply the numbers."], name="lrm")
    return CollabChatModel(small=small, large=large, policy=TrigReason(priming_steps=1))


def children(run: Run) -> list[tuple[str, str, Any]]:
    return [
        (child.name, child.extra["metadata"]["purpose"], child.outputs["generations"][0][0]["text"])
        for child in sorted(run.child_runs, key=lambda r: r.dotted_order or "")
    ]


EXPECTED = [
    ("large: lrm", "step", "Multiply the numbers."),
    ("small: srm", "step", "Then 6 * 7."),
    ("small: srm", "step", "That is 42."),
    ("small: srm", "step", "Final answer: 42"),
]


def test_invoke_reports_every_model_call_as_a_child_run_in_order() -> None:
    tracer = Capture()
    assert model().invoke("What is 6 * 7?", config={"callbacks": [tracer]}).content == "42"
    (root,) = tracer.runs
    assert root.run_type == "llm"
    assert children(root) == EXPECTED
    assert all(c.parent_run_id == root.id and c.run_type == "llm" for c in root.child_runs)
    assert "collab:large" in root.child_runs[0].tags


async def test_ainvoke_reports_them_to_an_async_tracer_too() -> None:
    tracer = AsyncCapture()
    await model().ainvoke("What is 6 * 7?", config={"callbacks": [tracer]})
    (root,) = tracer.runs
    assert children(root) == EXPECTED


def test_the_chat_model_is_still_one_chat_model_run_for_handlers_that_count_them() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Count(BaseCallbackHandler):
        def __init__(self) -> None:
            self.chat, self.llm = 0, 0

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            self.chat += 1

        def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
            self.llm += 1

    counter = Count()
    model().invoke("What is 6 * 7?", config={"callbacks": [counter]})
    assert (counter.chat, counter.llm) == (1, 4)


def test_a_failed_model_call_is_a_child_run_with_its_error() -> None:
    tracer = Capture()
    broken = CollabChatModel(
        small=ScriptedBackend([], name="srm"),
        large=ScriptedBackend(["Multiply the numbers."], name="lrm"),
        policy=TrigReason(priming_steps=1),
    )
    with pytest.raises(BackendError):
        broken.invoke("What is 6 * 7?", config={"callbacks": [tracer]})
    (root,) = tracer.runs
    failed = [c for c in root.child_runs if c.error]
    assert [c.name for c in failed] == ["small: srm"]


def test_a_sync_invoke_reports_its_answer_tokens_on_the_callers_thread() -> None:
    import threading

    from langchain_core.callbacks import BaseCallbackHandler

    class Threads(BaseCallbackHandler):
        def __init__(self) -> None:
            self.seen: set[int] = set()

        def on_llm_new_token(self, token: str, *, parent_run_id: Any = None, **kw: Any) -> None:
            if parent_run_id is None:  # the chat model's own run, not a model call's child run
                self.seen.add(threading.get_ident())

    handler = Threads()
    model().invoke("What is 2 + 2?", config={"callbacks": [handler]})
    assert handler.seen == {threading.get_ident()}
