"""The resilience cases' table: printed at the end of every pytest run that ran one (so `make test` shows the
figures too), and written as markdown to $RESILIENCE_REPORT when set (`make resilience`)."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import pytest

from tests.resilience.harness import RESULTS, CaseResult, format_codes, format_mib, format_ms

COLUMNS = ("case", "attack", "codes seen", "victim calls", "victim p99", "victim failures", "RSS growth (bound)")


def _row(result: CaseResult) -> tuple[str, ...]:
    victim = result.victim_calls is not None
    return (
        result.case,
        result.attack,
        format_codes(result.codes),
        str(result.victim_calls) if victim else "no victim",
        format_ms(result.victim_p99_ms),
        str(len(result.victim_failures)) if victim else "n/a",
        f"{format_mib(result.rss_growth_mib)} ({format_mib(result.rss_bound_mib)})",
    )


def _markdown(results: list[CaseResult]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "/").replace("\n", " ") for cell in cells) + " |"

    table = [line((*COLUMNS, "verdict")), line(("---",) * (len(COLUMNS) + 1))]
    table += [line((*_row(r), r.verdict)) for r in results]
    figures = [f"- **{r.case}**: " + "; ".join(f"{k} {v}" for k, v in r.figures.items()) for r in results if r.figures]
    failed = [f"- **{r.case}** {c.name}: {c.detail[:240]}" for r in results for c in r.checks if not c.ok]
    text = "\n".join(table)
    text += "\n\nFigures per case:\n\n" + "\n".join(figures) if figures else ""
    text += "\n\nFailed checks:\n\n" + "\n".join(failed) if failed else ""
    return text + "\n"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.write_sep("=", f"resilience: {len(RESULTS)} cases")
    for result in RESULTS:
        cells = dict(zip((*COLUMNS, "verdict"), (*_row(result), result.verdict), strict=True))
        terminalreporter.write_line(f"{result.case}: {result.verdict}")
        for key in COLUMNS[1:]:
            terminalreporter.write_line(f"    {key}: {cells[key]}")
        for key, value in result.figures.items():
            terminalreporter.write_line(f"    {key}: {value}")
    report = os.environ.get("RESILIENCE_REPORT")
    if report:
        path = Path(report)
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        header = (
            "# Resilience: hostile and faulty clients (`make resilience`)\n\n"
            f"Run {stamp} at commit {_commit()} on {os.cpu_count()} cores. Each case starts a real server on "
            "loopback and attacks it for a bounded time and count while a victim calls Attend (1,16,512) every "
            "50 ms and grpc.health.v1 Check every second.\n\n"
        )
        path.write_text(header + _markdown(RESULTS))
        terminalreporter.write_line(f"resilience report: {path}")
