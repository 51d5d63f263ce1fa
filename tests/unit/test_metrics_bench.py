"""Smoke test of `make bench-metrics` (bench/metrics_bench.py --quick): five real servers and an OTLP sink, a report
with every variant's throughput, the verdict and what tracing costs. No timing assertion: this machine is shared and
the run is short."""

from __future__ import annotations

import re
from pathlib import Path

from bench.metrics_bench import TRACING_ENV, VARIANTS, VERDICT_LINE, main


def test_quick_run_writes_the_report(served_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics_bench.md"
    assert main(["--model-dir", str(served_model), "--out", str(out), "--quick", "--no-control"]) == 0
    text = out.read_text()
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| kserve \| (\w+) \| [^|]+ \| (\d+) \|", text, re.M)}
    assert set(rows) == set(VARIANTS)
    assert all(rps > 0 for rps in rows.values()), rows
    verdicts = {m.group(1) for m in VERDICT_LINE.finditer(text)}
    assert verdicts == {"full", "metrics"}
    # The access log really differs between the variants: only `full` writes lines.
    written = dict(re.findall(r"(\w+) (\d+)", text.split("Access-log lines written by the servers:")[1].split("(")[0]))
    assert int(written["full"]) > 0 and written["metrics"] == "0" and written["off"] == "0"
    # Tracing really exported (to the sink) where it was on, and each tracing variant has its line against `metrics`.
    assert int(re.search(r"OTLP exports the sink received: (\d+)", text).group(1)) > 0  # type: ignore[union-attr]
    assert all(f"`{name}` (" in text and "vs `metrics`: throughput ratio" in text for name in TRACING_ENV)
