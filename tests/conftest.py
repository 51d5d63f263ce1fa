"""Shared fixtures: model directories exported once per session through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.export import main as export_main

PARITY_MAX_SEQ = 2048


@pytest.fixture(scope="session", params=[False, True], ids=["bidirectional", "causal"])
def exported_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model (d_model 512, 8 heads, seed 0), causal off and on, built-in routing."""
    out = tmp_path_factory.mktemp("models") / ("causal" if request.param else "bidirectional")
    argv = ["--out", str(out), "--max-seq-len", str(PARITY_MAX_SEQ), "--no-calibrate"]
    assert export_main([*argv, "--causal"] if request.param else argv) == 0
    return out
