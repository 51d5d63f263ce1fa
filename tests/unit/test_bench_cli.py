"""Every bench's command line answers --help (argparse formats each help text, so a bare % fails here)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

BENCHES = ("model_bench", "serve_bench", "metrics_bench", "batching_bench", "workers_bench")


@pytest.mark.parametrize("name", BENCHES)
def test_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module(f"bench.{name}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert f"python -m bench.{name}" in capsys.readouterr().out


def test_serve_bench_provider_reaches_the_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--provider cuda (make gpu-check): every `python -m service` serve_bench starts inherits ATTNSERVE_PROVIDER."""
    monkeypatch.setenv("ATTNSERVE_PROVIDER", "auto")  # restored afterwards, whatever main sets
    main = importlib.import_module("bench.serve_bench").main
    with pytest.raises(SystemExit, match="no model"):
        main(["--provider", "cuda", "--model-dir", str(tmp_path)])
    assert os.environ["ATTNSERVE_PROVIDER"] == "cuda"
