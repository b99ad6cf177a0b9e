"""First use of the models' files from several threads at once, in a fresh interpreter.

transformers resolves its top-level names lazily, and two threads doing so together used to
fail with ``cannot import name 'AutoTokenizer' from 'transformers'`` (seen in ``eval
--concurrency 2`` on the bundled pair). A fresh process is needed: once a name is resolved, the
race is gone for good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    from collab_agent.backends import gguf, tiny
    from collab_agent.backends.openai.prompts import Prompts

    SMALL = "bundled:qwen2.5-coder-0.5b-instruct"
    jobs = [
        lambda: gguf.gguf_tokenizer(SMALL),
        lambda: Prompts(SMALL, "small").local_tokenizer(),
        lambda: tiny.tiny_qwen2(0),
    ]
    start = threading.Barrier(len(jobs))
    errors = []

    def run(job):
        start.wait()
        try:
            job()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(errors))
    """
)


def test_tokenizers_and_tiny_models_load_from_three_threads_at_once_in_a_fresh_process() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors == []
