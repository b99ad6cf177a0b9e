"""One lock for importing from transformers off the main thread.

transformers resolves its top-level names lazily, and two threads resolving names at the same
time can fail with ``ImportError: cannot import name 'AutoTokenizer' from 'transformers'``
(a partly initialised module is handed to the second thread). The first model or tokenizer
load of a backend may run in a worker thread (``CollabChatModel.batch``, ``eval
--concurrency``), so every lazy import from transformers in this package, and every tokenizer
or model load that resolves further names inside transformers, holds `IMPORT_LOCK`.
"""

from __future__ import annotations

import threading

__all__ = ["IMPORT_LOCK"]

IMPORT_LOCK = threading.RLock()
"""Held while importing from transformers or loading a tokenizer or model (reentrant)."""
