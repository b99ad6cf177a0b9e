"""Model spec strings: the kind table reads each kind's syntax, names what is wrong, builds the
backend; a new kind is one line in `KINDS` (the CONTRIBUTING recipe, tried here)."""

from __future__ import annotations

import pytest

from collab_agent.backends.base import GenerateRequest, Generation
from collab_agent.backends.specs import (
    KINDS,
    Kind,
    LoadOptions,
    ModelSpec,
    load_backend,
    parse_spec,
)
from collab_agent.chat_model import CollabChatModel
from collab_agent.errors import CapabilityError, ConfigError
from collab_agent.langchain import backends as lc_backends
from collab_agent.policies.fixed import LargeOnly
from collab_agent.testing import ScriptedBackend


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("tiny", ModelSpec("tiny", "0")),
        ("tiny:3", ModelSpec("tiny", "3")),
        ("bundled:qwen", ModelSpec("bundled", "qwen")),
        ("hf:./model", ModelSpec("hf", "./model")),
        ("llamacpp:bundled:qwen", ModelSpec("llamacpp", "bundled:qwen")),
        ("openai:m@a@http://h:1/v1", ModelSpec("openai", "m@a", "http://h:1/v1")),
    ],
)
def test_each_kind_reads_its_syntax(spec: str, parsed: ModelSpec) -> None:
    assert parse_spec(spec) == parsed
    assert parse_spec(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "non-empty"),
        ("qwen", "is not one of bundled:NAME, hf:PATH, openai:MODEL@URL"),
        ("tiny:x", "integer seed"),
        ("openai:m@ftp://h", "openai:MODEL@http(s)://HOST/v1"),
        ("gguf:x", "unknown kind 'gguf'"),
    ],
)
def test_a_bad_spec_names_what_is_wrong(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="model spec") as caught:
        parse_spec(spec)
    assert fragment in str(caught.value)


def test_an_openai_spec_builds_a_server_backend_with_the_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from collab_agent.backends.openai import OpenAIBackend

    monkeypatch.setenv("MY_KEY", "sk-spec-SECRET")
    backend = load_backend("openai:m@http://127.0.0.1:9/v1", api_key_env="MY_KEY", timeout=3.0)
    assert isinstance(backend, OpenAIBackend)
    assert backend.timeout == 3.0 and backend._http._options["api_key"] == "sk-spec-SECRET"
    assert "sk-spec-SECRET" not in repr(backend)


class Echo:
    """A new backend for the recipe: answers with the spec's target text."""

    def __init__(self, text: str, prefix: str = "") -> None:
        self.name, self.text = f"echo:{text}", prefix + text

    async def generate(self, request: GenerateRequest) -> Generation:
        return Generation(text=self.text, stop_reason="eos", completion_tokens=1)


def test_a_new_kind_is_one_line_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "echo", Kind(lambda spec, given: Echo(spec.target, **given.options)))
    assert parse_spec("echo:Final answer: 4") == ModelSpec("echo", "Final answer: 4")
    backend = load_backend("echo:4", prefix="Final answer: ")
    assert isinstance(backend, Echo) and backend.text == "Final answer: 4"
    model = CollabChatModel(
        small=ScriptedBackend(["unused"]), large="echo:Final answer: 4", policy=LargeOnly()
    )
    result = model.invoke("2 + 2?")
    assert str(result.content).endswith("4")
    assert result.response_metadata["collab"]["answer_author"] == "large"


def test_load_options_reach_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[LoadOptions] = []
    monkeypatch.setitem(KINDS, "probe", Kind(lambda spec, given: seen.append(given) or Echo("")))
    load_backend("probe:x", api_key_env="K", threads=2, parallel=3, a=1)
    assert seen == [LoadOptions({"a": 1}, "K", 2, 3)]
    with pytest.raises(ConfigError, match="parallel"):
        load_backend("probe:x", parallel=0)


def _probe_kind(monkeypatch: pytest.MonkeyPatch, seen: list[LoadOptions], **flags: bool) -> None:
    """A kind ``probe`` with ``flags`` whose loader records what it was given."""

    def load(spec: ModelSpec, given: LoadOptions) -> Echo:
        seen.append(given)
        return Echo(spec.target)

    monkeypatch.setitem(KINDS, "probe", Kind(load, **flags))
    monkeypatch.setattr(lc_backends, "LOCAL_BACKENDS", {})


def _answer(large: str, **fields: object) -> str:
    model = CollabChatModel(
        small=ScriptedBackend(["unused"]), large=large, policy=LargeOnly(), **fields
    )
    return str(model.invoke("2 + 2?").content)


def test_a_server_kind_not_shared_is_built_per_chat_model_with_retries_timeout_and_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[LoadOptions] = []
    _probe_kind(monkeypatch, seen, server=True, shared=False)
    for _ in range(2):
        answer = _answer("probe:Final answer: 4", timeout=9.0, max_retries=2, api_key="sk-SECRET")
        assert answer.endswith("4")
    assert len(seen) == 2  # one per chat model: each owns (and closes) its own
    assert seen[0].options == {"max_retries": 2, "timeout": 3.0}
    assert seen[0].api_key == "sk-SECRET" and "sk-SECRET" not in repr(seen[0])


def test_a_shared_local_kind_is_loaded_once_per_process_without_server_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[LoadOptions] = []
    _probe_kind(monkeypatch, seen)
    for _ in range(2):
        assert _answer("probe:Final answer: 4", timeout=9.0).endswith("4")
    assert len(seen) == 1 and seen[0].options == {}


@pytest.mark.parametrize(("batches", "options"), [(True, {"max_batch_size": 4}), (False, {})])
def test_the_server_sets_a_kind_up_for_concurrent_requests_by_its_flags(
    monkeypatch: pytest.MonkeyPatch, batches: bool, options: dict[str, int]
) -> None:
    from collab_agent.serve.launch import load_served_backend

    seen: list[LoadOptions] = []
    _probe_kind(monkeypatch, seen, batches=batches)
    load_served_backend("probe:x", parallel=4, threads=1, api_key_env="K")
    assert seen == [LoadOptions(options, "K", threads=1, parallel=4)]


class Words:
    """A tokenizer of one token per word."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [len(word) for word in text.split()]}


def test_a_kind_that_declares_its_tokenizer_counts_tokens_without_loading_a_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[LoadOptions] = []
    monkeypatch.setitem(KINDS, "probe", Kind(lambda spec, given: seen.append(given) or Echo("")))
    monkeypatch.setitem(
        KINDS, "worded", Kind(lambda spec, given: Echo(""), tokenizer=lambda spec: Words())
    )
    model = CollabChatModel(small="worded:small-counted", large="worded:large-counted")
    assert model.get_num_tokens("What is 17 * 23?") == 5
    with pytest.raises(CapabilityError, match="cannot be read offline"):
        CollabChatModel(small="probe:uncounted", large="worded:large-counted").get_num_tokens("q")
    assert seen == []  # no backend was built to count
