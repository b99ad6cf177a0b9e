"""Each model call of a collaboration as a child run in LangChain callbacks.

`TracedBackend` wraps a backend for one chat-model call: every `generate` or `stream` is reported to the
call's callback manager as a chat-model run (``on_chat_model_start`` / ``on_llm_end`` /
``on_llm_error``) under the collaboration's own run, named ``"small: MODEL"`` or
``"large: MODEL"`` and tagged with the role and the purpose (step, answer, judge), so LangSmith,
Langfuse or any tracer shows who wrote what and when.

LangChain hands the run manager to the model in ``invoke``/``ainvoke``/``batch`` and in a
LangGraph node's streamed ``invoke``, not in a direct ``model.stream``/``astream`` call: there
the calls are not child runs (the collaboration is still in ``response_metadata``).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Mapping
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncRunManager,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from collab_agent.backends.base import Backend, GenerateRequest, Generation, stream_generation


def _prompt(request: GenerateRequest) -> str:
    """The request as text: each message as ``role: content``, then the reasoning it continues."""
    lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in request.messages]
    if request.reasoning:
        lines.append(f"assistant (continued): {request.reasoning}")
    return "\n\n".join(lines)


def _result(backend: Backend, generation: Generation) -> LLMResult:
    usage = {
        "input_tokens": generation.prompt_tokens,
        "output_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }
    message = AIMessage(
        generation.text,
        usage_metadata=usage,  # type: ignore[arg-type]
        response_metadata={"stop_reason": generation.stop_reason},
    )
    return LLMResult(
        generations=[[ChatGeneration(message=message)]],
        llm_output={"model_name": backend.name, "token_usage": usage},
    )


class TracedBackend:
    """``backend`` with every call reported as a child run of ``manager``'s run.

    Every other attribute (``score``, ``release``, capabilities) is the wrapped backend's.
    """

    def __init__(self, backend: Backend, role: str, manager: BaseCallbackManager) -> None:
        self.backend = backend
        self.role = role
        self.manager = manager

    @property
    def name(self) -> str:
        return self.backend.name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.backend, attribute)

    async def generate(self, request: GenerateRequest) -> Generation:
        """The wrapped backend's generation, reported as a child chat-model run."""
        run = await self._start(request)
        try:
            generation = await self.backend.generate(request)
        except BaseException as error:
            await notify(run.on_llm_error, error)
            raise
        await notify(run.on_llm_end, _result(self.backend, generation))
        return generation

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generation]:
        """The wrapped backend's deltas then generation (`stream_generation`), reported as a
        child run with each delta as a new token."""
        run = await self._start(request)
        try:
            async for item in stream_generation(self.backend, request):
                if isinstance(item, Generation):
                    await notify(run.on_llm_end, _result(self.backend, item))
                else:
                    await notify(run.on_llm_new_token, item)
                yield item
        except BaseException as error:
            await notify(run.on_llm_error, error)
            raise

    async def _start(self, request: GenerateRequest) -> Any:
        """Start the child run of one call; its run manager (sync or async)."""
        manager = self.manager.copy()
        manager.add_tags([f"collab:{self.role}", f"purpose:{request.purpose}"], inherit=False)
        manager.add_metadata(
            {
                "collab_role": self.role,
                "purpose": request.purpose,
                "ls_model_name": self.backend.name,
                "ls_provider": "collab-agent",
                "ls_model_type": "llm",
                "ls_temperature": request.sampling.temperature,
                "ls_max_tokens": request.max_tokens,
            },
            inherit=False,
        )
        options: Mapping[str, Any] = {
            "name": f"{self.role}: {self.backend.name}",
            "invocation_params": {
                "model": self.backend.name,
                "max_tokens": request.max_tokens,
                "temperature": request.sampling.temperature,
                "stop": list(request.stop),
            },
        }
        serialized = {"name": self.backend.name}
        (run,) = await notify(manager.on_llm_start, serialized, [_prompt(request)], **options)  # type: ignore[attr-defined]
        return run


async def notify(method: Any, *args: Any, **kwargs: Any) -> Any:
    """``method(...)`` of a sync or async callback or run manager, awaited when it is async's
    (a sync manager's handlers then run on the calling event loop's thread)."""
    result = method(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def traced(backend: Backend, role: str, run_manager: Any) -> Backend:
    """``backend`` reporting to ``run_manager``'s children, or as it is without a manager."""
    if run_manager is None:
        return backend
    return TracedBackend(backend, role, _children_of(run_manager))  # type: ignore[return-value]


def _children_of(run_manager: Any) -> BaseCallbackManager:
    """A callback manager whose runs are children of ``run_manager``'s run (an LLM run manager
    has no ``get_child``; this is what a chain's does)."""
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncRunManager) else CallbackManager
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return manager
