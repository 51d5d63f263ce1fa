"""The main log as operators read it: --log-format json on a real server, and --help naming every variable."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.server_process import log_message, run_service, start_server

REQUIRED = {"time", "level", "logger", "message"}


def _entries(lines: list[str]) -> list[dict[str, object]]:
    """Each stderr line as the JSON object it must be; a failure names the line that is not."""
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(entry, dict) and entry.keys() >= REQUIRED, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry["time"])), line
        entries.append(entry)
    return entries


def test_json_log_from_start_to_drain(served_model: Path) -> None:
    process = start_server(served_model, "--log-format", "json", "--warmup", "false")
    try:
        ready_at = next(i for i, line in enumerate(process.log_lines) if "attnserve ready" in log_message(line))
        started = _entries(process.log_lines[: ready_at + 1])
        assert started[-1]["logger"] == "service.app.server" and started[-1]["level"] == "INFO"
        assert any(str(entry["message"]).startswith("limits: memory budget") for entry in started)
    finally:
        assert process.stop() == 0
    drained = _entries(process.log_lines[ready_at + 1 :])  # SIGTERM's lines too
    assert any(str(entry["message"]).startswith("drain:") for entry in drained), drained


def test_json_start_up_failure_is_a_json_line(tmp_path: Path) -> None:
    done = run_service("--model-dir", str(tmp_path / "nope"), env={"ATTNSERVE_LOG_FORMAT": "json"})
    assert done.returncode == 1
    entry = _entries(done.stderr.splitlines())[-1]  # every line JSON, the reason last
    assert entry["level"] == "CRITICAL" and "config.json not found" in str(entry["message"])


def test_help_lists_env_vars_defaults_and_values() -> None:
    done = run_service("--help", env={"COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps at the terminal's width
    assert "--grpc-port INT gRPC port (0 picks a free one) [env ATTNSERVE_GRPC_PORT; default 8001;" in text
    assert "[env ATTNSERVE_PROVIDER; default auto; one of auto, cpu, cuda]" in text
    assert "--log-format {text,json}" in text and "ATTNSERVE_LOG_FORMAT" in text
