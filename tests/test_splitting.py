"""The step splitter (where a step ends, how short lines merge, which pair gets which) and the
token-streaming reveals (what of a step or answer being decoded may be shown yet)."""

from __future__ import annotations

import pytest

from collab_agent.backends.base import Generation
from collab_agent.backends.bundled import BUNDLED
from collab_agent.backends.specs import LARGE_BUNDLED, SMALL_BUNDLED
from collab_agent.errors import ConfigError
from collab_agent.policies import SmallOnly
from collab_agent.prompting import STEPWISE, THINK
from collab_agent.reasoner import Reasoner
from collab_agent.splitting import (
    BLANK_LINE,
    LINE,
    SPLITTERS,
    StepSplitter,
    choose_splitter,
    merge,
    resolve_splitter,
    splitter_for_pair,
)
from collab_agent.streaming import AnswerReveal, StepReveal
from collab_agent.testing import ScriptedBackend, ScriptedStep

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


# ============================================================================ merging short lines
async def test_line_splitter_merges_a_short_line_with_the_lines_after_it() -> None:
    small = ScriptedBackend(["1.", "Add two and three to get five.", "Final answer: 5"])
    splitter = StepSplitter("line", "\n", min_tokens=3)
    reasoner = Reasoner(small, ScriptedBackend([]), policy=SmallOnly(), splitter=splitter)
    trace = await reasoner.run(QUESTION)
    assert [s.text for s in trace.steps] == ["1.\nAdd two and three to get five."]
    assert trace.steps[0].tokens == 1 + 7
    # The continuation was asked of the same model, after the short line and its delimiter.
    assert small.requests[1].reasoning.endswith("1.\n")
    assert small.requests[1].stop == ("\n",)
    assert trace.answer == "5"


async def test_an_empty_continuation_keeps_the_step_open_for_the_next_writer() -> None:
    """A continuation that decodes nothing (a server that answers 0 tokens after a prompt
    ending in the delimiter) must not turn the step's end into the end of the reasoning."""
    small = ScriptedBackend(
        ["1.", ScriptedStep("", logprobs=[], stop_reason="eos"), "Add two and three.",
         "Final answer: 5"]
    )  # fmt: skip
    splitter = StepSplitter("line", "\n", min_tokens=3)
    reasoner = Reasoner(small, ScriptedBackend([]), policy=SmallOnly(), splitter=splitter)
    trace = await reasoner.run(QUESTION)
    assert trace.steps[0].text == "1." and trace.steps[0].stop_reason == "step"
    assert len(trace.steps) >= 2 and trace.answer == "5"


async def test_min_tokens_zero_never_merges() -> None:
    small = ScriptedBackend(["1.", "Add two and three.", "Final answer: 5"])
    reasoner = Reasoner(
        small, ScriptedBackend([]), policy=SmallOnly(), splitter=StepSplitter("line", "\n")
    )
    trace = await reasoner.run(QUESTION)
    assert [s.text for s in trace.steps] == ["1.", "Add two and three."]


def test_needs_more_only_for_a_short_step_that_ended_at_the_delimiter() -> None:
    short = Generation(text="1.", stop_reason="step", completion_tokens=1)
    assert LINE.needs_more(short)
    assert not LINE.needs_more(Generation(text="1.", stop_reason="eos", completion_tokens=1))
    assert not LINE.needs_more(Generation(text="x", stop_reason="step", completion_tokens=20))
    assert not BLANK_LINE.needs_more(short)


def test_merge_joins_texts_with_the_delimiter_and_adds_the_counts() -> None:
    first = Generation(text="1.", stop_reason="step", logprobs=[-0.1], completion_tokens=1)
    rest = Generation(text="Add.", stop_reason="eos", logprobs=[-0.2, -0.3], completion_tokens=2)
    merged = merge(first, rest, "\n")
    assert (merged.text, merged.stop_reason, merged.completion_tokens) == ("1.\nAdd.", "eos", 3)
    assert merged.logprobs == [-0.1, -0.2, -0.3]


# ============================================================================ bad input
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"delimiter": ""}, "delimiter"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),
        ({"min_tokens": 2.5}, "min_tokens"),
    ],
)
def test_a_bad_splitter_is_refused_naming_the_field(kwargs: dict, argument: str) -> None:
    fields = {"name": "x", "delimiter": "\n", **kwargs}
    with pytest.raises(ConfigError, match=argument):
        StepSplitter(**fields)


def test_resolve_splitter_by_name_and_unknown_names_are_typed_errors() -> None:
    assert resolve_splitter("line") is LINE and resolve_splitter("blank-line") is BLANK_LINE
    assert resolve_splitter(LINE) is LINE
    with pytest.raises(ConfigError, match=r"splitter.*blank-line.*line.*'lines'"):
        resolve_splitter("lines")
    with pytest.raises(ConfigError, match="splitter"):
        Reasoner(ScriptedBackend([]), ScriptedBackend([]), splitter="paragraph")


# ============================================================================ choosing
def test_a_bundled_pair_gets_its_metadata_splitter_and_others_the_default() -> None:
    expected = SPLITTERS[BUNDLED[SMALL_BUNDLED].splitter]
    assert BUNDLED[SMALL_BUNDLED].splitter == BUNDLED[LARGE_BUNDLED].splitter
    pair = (f"llamacpp:bundled:{SMALL_BUNDLED}", f"bundled:{LARGE_BUNDLED}")
    assert splitter_for_pair(*pair, BLANK_LINE) is expected
    assert splitter_for_pair("tiny-qwen2-0", f"bundled:{LARGE_BUNDLED}", BLANK_LINE) is BLANK_LINE
    assert splitter_for_pair("gpt-4o", "deepseek-r1", LINE) is LINE


def test_choose_splitter_prefers_the_argument_then_a_think_format_then_the_pair() -> None:
    pair = (f"bundled:{SMALL_BUNDLED}", f"bundled:{LARGE_BUNDLED}")
    assert choose_splitter("blank-line", *pair, LINE, think=False) is BLANK_LINE
    assert choose_splitter(None, *pair, BLANK_LINE, think=True) is BLANK_LINE
    paired = SPLITTERS[BUNDLED[SMALL_BUNDLED].splitter]
    assert choose_splitter(None, *pair, STEPWISE.splitter, think=False) is paired
    assert choose_splitter(None, "a", "b", THINK.splitter, think=True) is THINK.splitter


def test_the_reasoner_records_the_splitter_in_the_trace() -> None:
    reasoner = Reasoner(ScriptedBackend([]), ScriptedBackend([]), splitter="line")
    assert reasoner.format.splitter is LINE


# ============================================================================ reveals
def reveal_all(reveal: StepReveal | AnswerReveal, pieces: list[str]) -> list[str]:
    return [reveal.feed(p) for p in pieces]


def test_step_reveal_holds_back_a_tail_that_could_start_an_answer_marker() -> None:
    reveal = StepReveal(STEPWISE)
    shown = reveal_all(reveal, ["Add the", " numbers", ".", " Final ans", "wer: 5"])
    assert shown == ["Add the", " numbers", ".", "", ""]
    assert reveal.shown == "Add the numbers."


def test_step_reveal_shows_a_held_tail_once_it_is_not_a_marker() -> None:
    reveal = StepReveal(STEPWISE)
    assert reveal.feed("Final") == ""
    assert reveal.feed("ly done") == "Finally done"


def test_step_reveal_holds_back_trailing_whitespace_and_a_partial_close_tag() -> None:
    reveal = StepReveal(THINK)
    assert reveal_all(reveal, ["Think ", "hard.", "\n</th", "ink>\n\nAnswer"]) == [
        "Think",
        " hard.",
        "",
        "",
    ]
    assert reveal.shown == "Think hard."


def test_answer_reveal_shows_the_stripped_answer_piece_by_piece() -> None:
    reveal = AnswerReveal()
    pieces = ["\n", " 5", " apples", "  ", "\n"]
    shown = reveal_all(reveal, pieces)
    assert shown == ["", "5", " apples", "", ""]
    assert "".join(shown) == "".join(pieces).strip()
