"""Every bench's command line answers --help (argparse formats each help text, so a bare % fails here)."""

from __future__ import annotations

import importlib

import pytest

BENCHES = ("model_bench", "serve_bench", "metrics_bench", "batching_bench", "workers_bench")


@pytest.mark.parametrize("name", BENCHES)
def test_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module(f"bench.{name}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert f"python -m bench.{name}" in capsys.readouterr().out
