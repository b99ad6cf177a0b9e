"""The tokenizer inside a GGUF model file, read offline (no weights loaded, no server)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from collab_agent._hf import IMPORT_LOCK

__all__ = ["gguf_tokenizer"]


@functools.cache
def gguf_tokenizer(model: str) -> Any:
    """The tokenizer inside a GGUF model: ``bundled:NAME`` (cached once) or a ``.gguf`` path."""
    if model.startswith("bundled:"):
        from collab_agent.backends import bundled

        return bundled.load_tokenizer(model.removeprefix("bundled:"))
    path = Path(model).expanduser()
    with IMPORT_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
