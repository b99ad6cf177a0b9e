"""kvpress's presses as `bench kv` peer rows, run by a real kvpress in its own venv.

`make install-kvpress` builds ``.venv-kvpress`` (kvpress pins transformers<5.3); CI builds it
before the slow suite. ``COLLAB_KVPRESS_PYTHON`` points elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from test_cache_bench import tiny

from collab_agent.bench.kv import PEER_PRESSES, peer_kvpress, run_kv_bench
from collab_agent.errors import BackendError, ConfigError

KVPRESS_PYTHON = os.environ.get(
    "COLLAB_KVPRESS_PYTHON", str(Path(__file__).resolve().parents[1] / ".venv-kvpress/bin/python")
)
needs_kvpress = pytest.mark.skipif(
    not Path(KVPRESS_PYTHON).is_file(), reason="no kvpress venv: run `make install-kvpress`"
)


def contexts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, length), generator=g).tolist()


@pytest.mark.slow
@needs_kvpress
def test_each_press_keeps_its_budget_and_equals_kvpress_own_hook():
    large = tiny(1, 2, 8, 128)
    peer = peer_kvpress(
        KVPRESS_PYTHON,
        large,
        contexts(2, 200),
        contexts(2, 5, seed=1),
        [1.0, 0.2],
        extra={"check_hooks": True, "dtype": "float32"},
    )
    # the shared prefill leaves exactly the caches kvpress's own forward hook leaves
    assert peer["hook_max_abs_diff"] == 0.0
    assert set(peer["methods"]) == {f"kvpress_{p}" for p in PEER_PRESSES}
    for cells in peer["methods"].values():
        # nothing evicted: the press's decode is the reference's, token for token
        assert cells["1.0"]["top1_agreement"] == 1.0 and cells["1.0"]["kl"] < 1e-5
        assert 0.19 < cells["0.2"]["kv_bytes_ratio"] < 0.22
        assert cells["0.2"]["kl"] > 0


@pytest.mark.slow
@needs_kvpress
def test_bench_kv_puts_the_kvpress_rows_beside_its_own():
    small, large = tiny(0, 2, 4, 64), tiny(1, 2, 8, 128)
    with torch.inference_mode():
        result = run_kv_bench(
            small, large, contexts(2, 180), 4, [0.2], ("smallkv", "h2o"), peer_python=KVPRESS_PYTHON
        )
    assert set(result["methods"]) == {"smallkv", "h2o"} | {f"kvpress_{p}" for p in PEER_PRESSES}
    assert result["peer"]["transformers"] < "5.3"
    for name in PEER_PRESSES:
        cell = result["methods"][f"kvpress_{name}"]["0.2"]
        assert 0 <= cell["top1_agreement"] <= 1 and cell["kl"] >= 0


def test_a_missing_interpreter_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match="--peer-kvpress"):
        peer_kvpress("/nonexistent/python", tiny(1, 1, 8, 128), contexts(1, 20), [[1, 2]], [0.5])


def test_an_interpreter_without_kvpress_is_a_backend_error_that_says_how_to_install_it():
    # this venv has no kvpress: the script fails on import and the error says what to do
    with pytest.raises(BackendError, match="install-kvpress"):
        peer_kvpress(sys.executable, tiny(1, 1, 8, 128), contexts(1, 20), [[1, 2]], [0.5])
