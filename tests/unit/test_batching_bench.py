"""Smoke test of `make bench-batching` (bench/batching_bench.py --quick): three real servers, a report with every
section's table and a verdict for every target. No timing assertion: this machine is shared and the run is short."""

from __future__ import annotations

import re
from pathlib import Path

from bench.batching_bench import VERDICT_LINE, main

# One verdict per target; the overload's latency has one more per seq bucket that got answers.
CHECKS = {"mixed-throughput", "mixed-p99", "mixed-padding", "small-vs-echo", "overload-answered", "overload-rss"}


def _rows(text: str, header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header line starts with `header`, as column -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_quick_run_writes_the_report(served_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "batching_bench.md"
    assert main(["--model-dir", str(served_model), "--out", str(out), "--quick", "--provider", "cpu"]) == 0
    text = out.read_text()
    assert "provider: batching cpu, off cpu" in text

    mixed = {row["server"]: row for row in _rows(text, "| server | settings | req/s | tokens/s |")}
    assert set(mixed) == {"batching", "off"}
    assert all(float(row["req/s"]) > 0 for row in mixed.values()), mixed
    small = {row["server"]: row for row in _rows(text, "| server | req/s | p50 ms | p99 ms | req/s ÷ echo")}
    assert set(small) == {"batching", "off", "echo"}

    (overload,) = _rows(text, "| offered req/s |")
    sent, ok, errors = (int(overload[column]) for column in ("sent", "answered OK", "errors"))
    assert sent > 0 and sent == ok + errors, overload
    assert overload["every request answered"] == "yes"
    buckets = _rows(text, "| seq bucket (accepted) |")
    assert buckets and sum(int(row["n"]) for row in buckets) == ok
    (memory,) = _rows(text, "| RSS baseline MiB |")
    assert float(memory["RSS baseline MiB"]) > 0

    verdicts = {m.group(1): m.group(2) for m in VERDICT_LINE.finditer(text)}
    assert set(verdicts) >= CHECKS, verdicts
    latency = {name for name in verdicts if re.fullmatch(r"overload-p99-[\w+]+", name)}
    assert len(latency) == len(buckets), verdicts
