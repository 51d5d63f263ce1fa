"""`make report-latency` in miniature against the session's server: figures from the service's histograms."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.load import latency_report
from tests.server_process import ServerProcess

pytestmark = pytest.mark.load


def test_the_report_reads_the_service_histograms(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "latency_vs_seqlen.md"
    args = ["--address", server.address, "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics"]
    assert latency_report.main([*args, "--lengths", "16,256", "--seconds", "0.5", "--out", str(out)]) == 0
    text = out.read_text()
    rows = re.findall(r"^\| (16|256) \| (\d+|\+Inf) \| (\d+) \| ([0-9.]+) \|", text, flags=re.M)
    assert [(seq, bucket) for seq, bucket, _, _ in rows] == [("16", "16"), ("256", "256")]
    assert all(int(n) >= 20 for _, _, n, _ in rows)  # at least --min-requests answers, all in the histogram
    assert float(rows[1][3]) > float(rows[0][3])  # p50 grows with length
    assert re.search(r"latency ∝ n\^[0-9.]+", text) and out.with_suffix(".png").stat().st_size > 10_000
