"""The reasoning format: how a conversation plus partial reasoning becomes a request, where a
step ends, and how reasoning ends.

Two formats cover the models we meet:

- `STEPWISE` for instruct models without ``<think>`` (the bundled Qwen2.5-Coder pair): a system
  instruction asks for short steps separated by a blank line and a last line
  ``Final answer: ...``; reasoning ends at that marker (or ``\\boxed{``).
- `THINK` for reasoning models (R1-Distill, Qwen3): the assistant text opens with ``<think>``;
  reasoning ends at ``</think>``, and the answer follows it.

The step splitter is part of the format: TrigReason and SpecReason split reasoning into steps at
a blank line (``"\\n\\n"``, `BLANK_LINE`, both formats' default); a pair of instruct models that
write no blank line gets `LINE` instead (`splitter_for_pair`).

Why two splitters: ``<think>`` models write a blank line between paragraphs, but instruct
models often write a whole solution with single line breaks and no blank line, so a blank-line
split gives one huge step and the large model's priming step swallows the whole answer. `LINE`
ends a step at a line break instead, and merges a step shorter than ``min_tokens`` with the
lines after it, so list markers, headings and one-line fragments do not each become a step (and
do not each cost the triggers a decision).

A step is generated up to ``delimiter``; while it holds fewer than ``min_tokens`` tokens and
ended at the delimiter, the same model continues it past the delimiter (`needs_more`,
`merge`). Strategic priming, the budget and the step cap all count these merged steps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from collab_agent.errors import ConfigError, InvalidMessagesError
from collab_agent.types import Generation, Message

# ------------------------------------------------------------------ step splitters


@dataclass(frozen=True)
class StepSplitter:
    """How reasoning is cut into steps.

    Attributes:
        name: short name (``"blank-line"``, ``"line"``), recorded in the trace.
        delimiter: the stop string that ends a step (``"\\n\\n"`` or ``"\\n"``).
        min_tokens: a step that ended at the delimiter with fewer tokens than this is continued
            by the same model and merged with what follows (0: never merge).
    """

    name: str
    delimiter: str
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise ConfigError("delimiter", "must be a non-empty stop string, got ''")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise ConfigError("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens < 0:
            raise ConfigError("min_tokens", f"must be >= 0, got {self.min_tokens}")

    def needs_more(self, generation: Generation) -> bool:
        """Whether a step so far is too short and ended at the delimiter, so it continues."""
        return generation.stop_reason == "step" and generation.completion_tokens < self.min_tokens


BLANK_LINE = StepSplitter("blank-line", "\n\n")
"""The papers' split: a step ends at a blank line. The default for ``<think>`` models."""

LINE = StepSplitter("line", "\n", min_tokens=20)
"""A step ends at a line break once it holds at least 20 tokens (about one sentence of
arithmetic); shorter lines merge with the next. The default for instruct models."""

SPLITTERS: dict[str, StepSplitter] = {s.name: s for s in (BLANK_LINE, LINE)}
"""The named splitters (``Reasoner(splitter=...)``, ``CollabChatModel(splitter=...)``,
``--splitter``)."""


def resolve_splitter(value: StepSplitter | str, argument: str = "splitter") -> StepSplitter:
    """The splitter ``value`` names (or ``value`` itself).

    Raises:
        ConfigError: an unknown name or a value that is not a splitter.
    """
    if isinstance(value, StepSplitter):
        return value
    if isinstance(value, str) and value in SPLITTERS:
        return SPLITTERS[value]
    raise ConfigError(
        argument, f"must be one of {sorted(SPLITTERS)} or a StepSplitter, got {value!r}"
    )


def splitter_for_pair(small_name: str, large_name: str, default: StepSplitter) -> StepSplitter:
    """The splitter the bundled model metadata gives a pair whose names both name a bundled
    model (``llamacpp:qwen2.5-coder-0.5b-instruct``, ``bundled:...``) that agree on one, else
    ``default`` (the reasoning format's). ``<think>`` formats keep ``default``."""
    from collab_agent.backends.bundled import BUNDLED

    chosen = set()
    for name in (small_name.lower(), large_name.lower()):
        found = [m.splitter for m in BUNDLED.values() if m.name in name]
        if not found:
            return default
        chosen.update(found)
    return SPLITTERS[chosen.pop()] if len(chosen) == 1 else default


def choose_splitter(
    splitter: StepSplitter | str | None,
    small_name: str,
    large_name: str,
    fmt_splitter: StepSplitter,
    *,
    think: bool,
) -> StepSplitter:
    """The splitter a collaboration uses: ``splitter`` when given; else, for a ``<think>``
    format, the format's; else the pair's (`splitter_for_pair`)."""
    if splitter is not None:
        return resolve_splitter(splitter)
    if think:
        return fmt_splitter
    return splitter_for_pair(small_name, large_name, fmt_splitter)


def merge(first: Generation, rest: Generation, delimiter: str) -> Generation:
    """One generation from a step and its continuation past ``delimiter``: texts joined by the
    delimiter, tokens, logprobs, time and cost added; the continuation's stop reason."""
    logprobs = None
    if first.logprobs is not None and rest.logprobs is not None:
        logprobs = first.logprobs + rest.logprobs
    top = None
    if first.top_logprobs is not None and rest.top_logprobs is not None:
        top = first.top_logprobs + rest.top_logprobs
    return Generation(
        text=first.text + delimiter + rest.text,
        stop_reason=rest.stop_reason,
        logprobs=logprobs,
        top_logprobs=top,
        prompt_tokens=first.prompt_tokens + rest.prompt_tokens,
        cached_tokens=first.cached_tokens + rest.cached_tokens,
        completion_tokens=first.completion_tokens + rest.completion_tokens,
        seconds=first.seconds + rest.seconds,
        cost=first.cost + rest.cost,
        tool_calls=first.tool_calls + rest.tool_calls,
        reasoning_text=first.reasoning_text + rest.reasoning_text,
        stop_string=rest.stop_string,
        degraded=first.degraded or rest.degraded,
    )


# ------------------------------------------------------------------ reasoning formats

STEP_DELIMITER = BLANK_LINE.delimiter

STEPWISE_INSTRUCTION = (
    "Think step by step. Write your reasoning as short steps separated by a blank line. "
    "When you are done, write a last line of the form 'Final answer: <answer>'."
)

_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class ReasoningFormat:
    """How reasoning is laid out in the assistant turn.

    Attributes:
        name: short name (``"stepwise"``, ``"think"``).
        instruction: text added to the system prompt (``None`` adds nothing).
        open: text that starts the assistant turn's reasoning (``"<think>\\n"`` or ``""``).
        close: text that ends reasoning (``"</think>"``); empty when reasoning ends at an answer
            marker instead.
        answer_markers: markers (matched case-insensitively) that start the answer.
        answer_lead: text placed after the reasoning to make a model write the answer when
            reasoning stopped without one (budget, step cap, end of turn).
        splitter: where a step ends (`BLANK_LINE` or `LINE`); its ``delimiter`` is the stop
            string of every step.
    """

    name: str
    instruction: str | None
    open: str = ""
    close: str = ""
    answer_markers: tuple[str, ...] = ()
    answer_lead: str = "Final answer:"
    splitter: StepSplitter = BLANK_LINE

    @property
    def delimiter(self) -> str:
        """The stop string that ends a step (the splitter's)."""
        return self.splitter.delimiter

    # ------------------------------------------------------------------ requests
    def messages(self, conversation: Sequence[Message]) -> list[dict[str, Any]]:
        """The conversation with this format's instruction merged into the system prompt."""
        messages = [dict(m) for m in conversation]
        if not self.instruction:
            return messages
        if messages and messages[0].get("role") == "system":
            content = messages[0].get("content") or ""
            messages[0]["content"] = (
                f"{content}\n\n{self.instruction}" if content else self.instruction
            )
        else:
            messages.insert(0, {"role": "system", "content": self.instruction})
        return messages

    def reasoning_prefix(self, steps: Sequence[tuple[str, bool]]) -> str:
        """The assistant text so far: ``open`` then each step, a delimiter after each that
        ended at one (``(text, ended_at_delimiter)`` pairs)."""
        parts = [self.open]
        for text, delimited in steps:
            parts.append(text)
            if delimited:
                parts.append(self.delimiter)
        return "".join(parts)

    def answer_prefix(self, reasoning: str) -> str:
        """Assistant text after which a model writes the answer."""
        reasoning = reasoning.rstrip()
        if self.close:
            return f"{reasoning}\n{self.close}\n\n"
        return f"{reasoning}{self.delimiter}{self.answer_lead}"

    # ------------------------------------------------------------------ detection
    def end_of_reasoning(self, text: str) -> int | None:
        """Index in ``text`` where reasoning ends (close tag or answer marker), else ``None``."""
        found: list[int] = []
        if self.close:
            i = text.find(self.close)
            if i >= 0:
                found.append(i)
        lowered = text.lower()
        for marker in self.answer_markers:
            i = lowered.find(marker.lower())
            if i >= 0:
                found.append(i)
        return min(found) if found else None

    def extract_answer(self, text: str) -> str:
        """The answer part of the text that ended reasoning (after the close tag or marker)."""
        if self.close and self.close in text:
            return text.split(self.close, 1)[1].strip()
        lowered = text.lower()
        for marker in self.answer_markers:
            i = lowered.find(marker.lower())
            if i >= 0:
                if marker.endswith(":"):
                    return text[i + len(marker) :].strip()
                return text[i:].strip()
        return text.strip()


STEPWISE = ReasoningFormat(
    name="stepwise",
    instruction=STEPWISE_INSTRUCTION,
    answer_markers=("Final answer:", "\\boxed{"),
)
THINK = ReasoningFormat(
    name="think",
    instruction=None,
    open="<think>\n",
    close="</think>",
    answer_lead="",
)
FORMATS = {f.name: f for f in (STEPWISE, THINK)}


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check a conversation before any model runs; return plain dict copies.

    Raises:
        InvalidMessagesError: no messages, an unknown role, content that is not text, or a last
            message that is not from the user or a tool.
    """
    if not messages:
        raise InvalidMessagesError(
            "messages: the conversation is empty; give at least one user message"
        )
    checked: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidMessagesError(
                f"messages[{i}]: expected a mapping with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidMessagesError(
                f"messages[{i}].role: {role!r} is not one of {sorted(_ROLES)}"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise InvalidMessagesError(
                f"messages[{i}].content: expected text, got {type(content).__name__}"
            )
        checked.append(dict(message))
    last = checked[-1]["role"]
    if last not in ("user", "tool"):
        raise InvalidMessagesError(
            f"messages[-1].role: the last message must come from the user or a tool, got {last!r}"
        )
    return checked


_WHITESPACE = re.compile(r"\s+")


def normalise_step(text: str) -> str:
    """Lower-case, whitespace-collapsed text, for comparing steps."""
    return _WHITESPACE.sub(" ", text.strip().lower())
