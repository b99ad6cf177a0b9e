"""Evaluation data sets: JSON Lines files with one problem per line.

Each line is a JSON object with at least ``id`` (a string or an integer), ``question`` and
``answer`` (the reference answer, a string or a number); other fields are kept in
`Problem.extra`. The bundled benchmarks (GSM8K, MATH-500, AIME 2024/2025) live in the shared data
folder: ``$COLLAB_AGENT_DATA`` when set, else ``../shared/data`` next to the repository, and are
named by their file stem (``"gsm8k_test"``, ``"math500"``, ``"aime24"``, ``"aime25"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collab_agent.errors import ConfigError

DATA_ENV = "COLLAB_AGENT_DATA"
"""Environment variable naming the folder of the bundled data sets."""


class DatasetError(ConfigError):
    """A data set file is missing or holds a malformed record; the message names the line."""

    def __init__(self, path: str | os.PathLike[str], problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__("data", f"{where}: {problem}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True)
class Problem:
    """One evaluation problem.

    Attributes:
        id: the problem's stable id (unique within its file).
        question: the problem statement given to the model.
        answer: the reference final answer, as a string.
        source: the benchmark name (``"gsm8k"``, ``"math500"``...), when the file says.
        extra: every other field of the record (``solution``, ``level``...).
    """

    id: str
    question: str
    answer: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def messages(self) -> list[dict[str, str]]:
        """The conversation to send: the question as one user message."""
        return [{"role": "user", "content": self.question}]


def data_dir() -> Path:
    """The folder of the bundled data sets (``$COLLAB_AGENT_DATA`` or ``../shared/data``)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


class DatasetNotFoundError(ConfigError, FileNotFoundError):
    """Neither a file nor a bundled data set has the name given."""

    def __init__(self, problem: str) -> None:
        ConfigError.__init__(self, "data", problem)


def resolve_dataset(name_or_path: str | os.PathLike[str]) -> Path:
    """The file of a data set given by path or by the name of a bundled one.

    Raises:
        DatasetNotFoundError: (a `ConfigError` and a `FileNotFoundError`) neither a file at
            that path nor a bundled data set of that name exists; the message lists the
            bundled ones.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = data_dir()
    for candidate in (folder / f"{path}", folder / f"{path}.jsonl"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
    raise DatasetNotFoundError(
        f"no file {str(path)!r} and no bundled data set of that name in {folder} "
        f"(known: {', '.join(known) or 'none'}; set ${DATA_ENV} to the data folder)"
    )


def iter_problems(path: str | os.PathLike[str]) -> Iterator[Problem]:
    """Read problems from a JSON Lines file one by one; blank lines are skipped.

    Raises:
        DatasetError: a line is not a JSON object, lacks ``id``/``question``/``answer``, has a
            field of the wrong type, or repeats an id; the message names the file and line.
    """
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    path, f"not valid JSON ({e.msg} at column {e.colno})", number
                ) from e
            problem = _problem(path, record, number)
            if problem.id in seen:
                raise DatasetError(path, f"duplicate id {problem.id!r}", number)
            seen.add(problem.id)
            yield problem


def load_dataset(
    name_or_path: str | os.PathLike[str], *, limit: int | None = None, offset: int = 0
) -> list[Problem]:
    """The problems of a data set, in file order.

    Args:
        name_or_path: a JSON Lines file, or a bundled data set's name (``"gsm8k_test"``).
        limit: keep at most this many problems (after ``offset``); ``None`` keeps all.
        offset: skip this many problems first.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError("limit", f"must be None or an integer >= 0, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ConfigError("offset", f"must be an integer >= 0, got {offset!r}")
    problems: list[Problem] = []
    for i, problem in enumerate(iter_problems(resolve_dataset(name_or_path))):
        if i < offset:
            continue
        if limit is not None and len(problems) >= limit:
            break
        problems.append(problem)
    return problems


def _problem(path: str | os.PathLike[str], record: Any, line: int) -> Problem:
    if not isinstance(record, dict):
        raise DatasetError(path, f"expected a JSON object, got {type(record).__name__}", line)
    missing = [k for k in ("id", "question", "answer") if k not in record]
    if missing:
        raise DatasetError(
            path,
            f"missing field(s) {', '.join(missing)} (each line needs id, question and answer)",
            line,
        )
    pid, question, answer = record["id"], record["question"], record["answer"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
        raise DatasetError(path, f"'id' must be a non-empty string or integer, got {pid!r}", line)
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(path, "'question' must be a non-empty string", line)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DatasetError(path, f"'answer' must be a string or a number, got {answer!r}", line)
    extra = {k: v for k, v in record.items() if k not in ("id", "question", "answer", "source")}
    source = record.get("source")
    return Problem(
        id=str(pid),
        question=question,
        answer=str(answer).strip(),
        source=source if isinstance(source, str) else "",
        extra=extra,
    )
