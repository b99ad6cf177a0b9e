"""Data sets: JSON Lines of id/question/answer, with errors that name the bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab_agent.errors import ConfigError
from collab_agent.evaluation.datasets import (
    DatasetError,
    Problem,
    data_dir,
    load_dataset,
    resolve_dataset,
)


def write(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def test_reads_records_in_order_and_keeps_extra_fields(tmp_path: Path) -> None:
    f = write(
        tmp_path / "d.jsonl",
        [
            {"id": 1, "question": "1+1?", "answer": 2, "level": 3},
            "",
            {"id": "b", "question": "2+2?", "answer": "4", "source": "mine"},
        ],
    )
    problems = load_dataset(f)
    assert [p.id for p in problems] == ["1", "b"]
    assert problems[0].answer == "2" and problems[0].extra == {"level": 3}
    assert problems[1].source == "mine"
    assert problems[0].messages() == [{"role": "user", "content": "1+1?"}]


def test_limit_and_offset(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", [{"id": i, "question": "q", "answer": i} for i in range(5)])
    assert [p.id for p in load_dataset(f, limit=2, offset=1)] == ["1", "2"]
    with pytest.raises(ConfigError, match="limit"):
        load_dataset(f, limit=-1)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"id": "x", "question": "q"}, "missing field.*answer"),
        ({"id": "x", "question": "", "answer": "1"}, "'question'"),
        ({"id": None, "question": "q", "answer": "1"}, "'id'"),
        ({"id": "x", "question": "q", "answer": [1]}, "'answer'"),
        ({"id": "a", "question": "q", "answer": "1"}, "duplicate id 'a'"),
    ],
)
def test_malformed_record_names_its_line(tmp_path: Path, bad: object, message: str) -> None:
    f = write(tmp_path / "d.jsonl", [{"id": "a", "question": "q", "answer": "1"}, "", bad])
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(f)
    assert info.value.line == 3
    assert "d.jsonl:3" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_unknown_dataset_lists_the_bundled_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "mine.jsonl", [{"id": 1, "question": "q", "answer": 1}])
    monkeypatch.setenv("COLLAB_AGENT_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert resolve_dataset("mine") == tmp_path / "mine.jsonl"
    with pytest.raises(FileNotFoundError, match="known: mine"):
        resolve_dataset("nope")


def test_bundled_gsm8k_is_found_by_name() -> None:
    try:
        problems = load_dataset("gsm8k_test", limit=3)
    except FileNotFoundError:
        pytest.skip("shared data folder not present")
    assert problems[0] == Problem(
        id="gsm8k-test-0000", question=problems[0].question, answer="18", source="gsm8k"
    )
    assert len(problems) == 3
