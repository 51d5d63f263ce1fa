"""`make bench-model` must keep working: a one-shape run writes a report with every column."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.model_bench import main as bench_main


@pytest.mark.parametrize("exported_model", [False], indirect=True, ids=["bidirectional"])
def test_bench_writes_report(exported_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "model_bench.md"
    assert (
        bench_main(
            [
                "--model-dir",
                str(exported_model),
                "--out",
                str(out),
                "--seqs",
                "16",
                "--batches",
                "1",
                "--rounds",
                "1",
                "--budget",
                "0.05",
            ]
        )
        == 0
    )
    report = out.read_text()
    assert "| 1 | 16 |" in report
    assert "fp32 GEMM rate measured in this run" in report
    for column in ("torch SDPA ms", "plain ms", "mha ms", "attention23 ms", "chosen % of GEMM"):
        assert column in report
