"""The one place that decides whether an answer stopped at a stop string or at the end of its
turn (`collab_agent.backends.openai.stops`): each rule, with the bodies llama.cpp, vLLM and
SGLang send, unstreamed and streamed."""

from __future__ import annotations

from typing import Any

import pytest

from collab_agent.backends.openai.stops import settle_streamed, stop_reason

STEP = ["\n\n"]


def entries(*tokens: str, ids: list[int] | None = None) -> dict[str, Any]:
    """A ``logprobs`` object in the ``content`` format, one entry per token."""
    ids = ids or list(range(len(tokens)))
    return {
        "content": [
            {"id": i, "token": t, "logprob": -0.1} for i, t in zip(ids, tokens, strict=True)
        ]
    }


def decide(
    choice: dict[str, Any], text: str, stop: list[str] = STEP, completion: int = 3
) -> tuple[str, str, str | None]:
    content = (choice.get("logprobs") or {}).get("content")
    count = None if content is None else len(content)
    return stop_reason(choice, text, stop, completion_tokens=completion, logprob_count=count)


def test_a_stop_string_left_in_the_text_is_cut_there() -> None:
    assert decide({"finish_reason": "stop"}, "a\n\nb") == ("a", "step", "\n\n")


def test_the_budget_running_out_is_length() -> None:
    assert decide({"finish_reason": "length"}, "abc") == ("abc", "length", None)


def test_tool_calls_end_the_turn() -> None:
    assert decide({"finish_reason": "tool_calls"}, "") == ("", "eos", None)


@pytest.mark.parametrize("field", ["stop_reason", "matched_stop"])  # vLLM, SGLang
def test_a_server_that_names_the_stop_string_is_believed(field: str) -> None:
    choice = {"finish_reason": "stop", field: "\n\n"}
    assert decide(choice, "abc", stop=["\n\n", "Final"]) == ("abc", "step", "\n\n")


def test_a_named_token_id_is_the_end_of_the_turn() -> None:  # vLLM's EOS: stop_reason=151645
    assert decide({"finish_reason": "stop", "stop_reason": 151645}, "abc") == ("abc", "eos", None)


def test_without_stop_strings_a_stop_is_the_end_of_the_turn() -> None:
    assert decide({"finish_reason": "stop"}, "abc", stop=[]) == ("abc", "eos", None)


def test_llamacpp_counts_stop_tokens_it_sends_no_logprobs_for() -> None:
    choice = {"finish_reason": "stop", "logprobs": entries("a", "b", "c")}
    assert decide(choice, "abc", completion=4) == ("abc", "step", "\n\n")
    # with several stop strings the one met is unknown
    assert decide(choice, "abc", stop=["\n\n", "Final"], completion=4) == ("abc", "step", None)


def test_llamacpp_end_of_turn_has_one_entry_per_counted_token() -> None:
    choice = {"finish_reason": "stop", "logprobs": entries("a", "b", "c")}
    assert decide(choice, "abc", completion=3) == ("abc", "eos", None)


@pytest.mark.parametrize(
    "logprobs",
    [entries("Let", ":\n\n"), {"tokens": ["Let", ":\n\n"], "token_logprobs": [-0.1, -0.2]}],
    ids=["content", "legacy"],
)
def test_a_last_token_running_into_the_stop_string_is_a_step(logprobs: dict[str, Any]) -> None:
    # the token ":\n\n" holds the answer's end and the stop; the text is cut inside it
    choice = {"finish_reason": "stop", "logprobs": logprobs}
    assert decide(choice, "Let:", completion=2) == ("Let:", "step", "\n\n")


def test_no_logprobs_and_no_name_is_the_end_of_the_turn() -> None:
    assert decide({"finish_reason": "stop"}, "abc") == ("abc", "eos", None)


# ---------------------------------------------------------------------------- streamed llama.cpp
def textless(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "token": "", "bytes": [], "logprob": -0.1} for i in ids]


class Detokenizer:
    def __init__(self, text: str | None) -> None:
        self.text, self.calls = text, []  # type: ignore[var-annotated]

    async def __call__(self, ids: list[int]) -> str | None:
        self.calls.append(ids)
        return self.text


async def test_streamed_stop_tokens_without_text_are_dropped_so_the_stop_reads_as_a_step() -> None:
    choice = {"finish_reason": "stop", "logprobs": entries("a", "b")}
    choice["logprobs"]["content"] += textless(271)  # llama.cpp holds "\n\n" back: no text
    detokenize = Detokenizer("\n\n")
    await settle_streamed(choice, STEP, detokenize)
    assert detokenize.calls == [[271]]
    assert decide(choice, "ab", completion=3) == ("ab", "step", "\n\n")


async def test_a_streamed_end_of_turn_token_without_text_is_kept() -> None:
    choice = {"finish_reason": "stop", "logprobs": entries("a", "b")}
    choice["logprobs"]["content"] += textless(151645)
    await settle_streamed(choice, STEP, Detokenizer("<|im_end|>"))
    assert decide(choice, "ab", completion=3) == ("ab", "eos", None)


async def test_a_server_that_cannot_detokenize_keeps_its_entries() -> None:
    choice = {"finish_reason": "stop", "logprobs": entries("a")}
    choice["logprobs"]["content"] += textless(271)
    await settle_streamed(choice, STEP, Detokenizer(None))
    assert len(choice["logprobs"]["content"]) == 2


async def test_a_streamed_token_cut_at_the_stop_gets_its_whole_text_back() -> None:
    last = {"id": 25, "token": ":", "logprob": -0.1,
            "top_logprobs": [{"id": 25, "token": ":\n\n", "logprob": -0.1}]}  # fmt: skip
    choice = {"finish_reason": "stop", "logprobs": {"content": [{"id": 1, "token": "Let"}, last]}}
    detokenize = Detokenizer("unused")
    await settle_streamed(choice, STEP, detokenize)
    assert last["token"] == ":\n\n" and detokenize.calls == []
    assert decide(choice, "Let:", completion=2) == ("Let:", "step", "\n\n")


async def test_other_finishes_are_left_as_they_are() -> None:
    choice = {"finish_reason": "length", "logprobs": {"content": textless(271)}}
    detokenize = Detokenizer("\n\n")
    await settle_streamed(choice, STEP, detokenize)
    assert detokenize.calls == [] and len(choice["logprobs"]["content"]) == 1
