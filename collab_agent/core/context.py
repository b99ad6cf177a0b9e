"""The context-length check before any model runs: prompt + reasoning budget + answer must fit
each model's context window.

An explicit budget that cannot fit raises `ContextLengthError`; the default budget is capped to
the room the smaller context leaves. A backend whose window or tokenizer is unknown (a remote
server without ``tokenizer=`` / ``context_window=``) is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from collab_agent import defaults
from collab_agent.backends.tokens import backend_tokenizer, context_window, prompt_tokens
from collab_agent.errors import ContextLengthError


def fit_budget(
    backends: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    budget: int | None,
    answer_max_tokens: int,
) -> int:
    """The reasoning budget a call may use.

    Args:
        backends: the models by role (``{"small": ..., "large": ...}``).
        messages: the conversation as the models read it (instruction merged in).
        tools: tools rendered into the prompt, if any.
        budget: the budget asked for; ``None`` takes `defaults.REASONING_BUDGET`, capped to fit.
        answer_max_tokens: the most tokens of the answer, which follows the reasoning.

    Raises:
        ContextLengthError: the prompt and the answer alone do not fit a model's context, or an
            explicit ``budget`` does not fit beside them.
    """
    fitted = defaults.REASONING_BUDGET if budget is None else budget
    for role, backend in backends.items():
        window = context_window(backend)
        tokenizer = backend_tokenizer(backend) if window is not None else None
        if window is None or tokenizer is None:
            continue
        prompt = prompt_tokens(tokenizer, messages, tools)
        room = window - prompt - answer_max_tokens - defaults.CONTEXT_MARGIN
        name = getattr(backend, "name", role)
        if room <= 0:
            raise ContextLengthError(
                "messages",
                f"the prompt has {prompt} tokens and the answer may take {answer_max_tokens}, "
                f"which leaves no room for reasoning in the {role} model {name}'s context of "
                f"{window} tokens; shorten the conversation or lower max_tokens",
            )
        if fitted > room:
            if budget is not None:
                raise ContextLengthError(
                    "reasoning_budget",
                    f"{budget} reasoning tokens after a prompt of {prompt} tokens, with "
                    f"{answer_max_tokens} for the answer, exceed the {role} model {name}'s "
                    f"context of {window} tokens; give at most {room}, or leave it unset to fit",
                )
            fitted = room
    return fitted
