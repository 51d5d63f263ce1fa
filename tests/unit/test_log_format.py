"""The main log's JSON format (--log-format json): one parseable object per record, whatever the record holds."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from service.observe.log_format import (
    MAX_ID_CHARS,
    MAX_MESSAGE_CHARS,
    TEXT_FORMAT,
    JsonFormatter,
    clip,
    log_handler,
    rfc3339_utc,
)

RFC3339_MILLIS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("service.app.server", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)  # what logging does with extra=
    return record


def _format(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii(), line
    entry = json.loads(line)
    assert isinstance(entry, dict)
    return entry


def test_a_record_is_one_object_with_the_required_keys() -> None:
    entry = _format(_record("warm-up done in %.2f s", 1.5))
    assert set(entry) == {"time", "level", "logger", "message"}
    assert entry["message"] == "warm-up done in 1.50 s"
    assert (entry["level"], entry["logger"]) == ("WARNING", "service.app.server")
    assert RFC3339_MILLIS_UTC.fullmatch(entry["time"]), entry["time"]


def test_time_is_utc_with_milliseconds() -> None:
    assert rfc3339_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_utc(1795985822.9876) == "2026-11-29T20:57:02.987Z"  # truncated, never rounded up to .988/:03


def test_request_and_trace_ids_come_from_extra() -> None:
    entry = _format(_record("refused", request_id="req-42", trace_id="4bf92f3577b34da6a3ce929d0e0e4736"))
    assert (entry["request_id"], entry["trace_id"]) == ("req-42", "4bf92f3577b34da6a3ce929d0e0e4736")
    assert "request_id" not in _format(_record("no ids", request_id=None))


def test_an_exception_is_a_string_field_on_the_same_line() -> None:
    entry = _format(_record("engine run failed", exc=True))
    assert entry["message"] == "engine run failed"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: bad\nvalue")


@pytest.mark.parametrize(
    "hostile",
    ['quote " backslash \\ brace }', "new\nline\r\nand\ttab", "\x00\x1b[31mred\u2028\u2029", "non-ASCII ≤ µs 🙂"],
)
def test_any_message_stays_one_line_of_valid_json(hostile: str) -> None:
    entry = _format(_record("client sent %r: %s", hostile, hostile, request_id=hostile))
    assert entry["message"] == f"client sent {hostile!r}: {hostile}" and entry["request_id"] == hostile


def test_huge_client_strings_are_clipped() -> None:
    huge = "x" * 10_000_000
    line = JsonFormatter().format(_record("bad name %s", huge, request_id=huge, trace_id=huge))
    assert len(line) < MAX_MESSAGE_CHARS + 2 * MAX_ID_CHARS + 500, len(line)
    entry = json.loads(line)
    assert entry["message"].startswith("bad name xxx") and "characters cut" in entry["message"]
    assert len(entry["request_id"]) < MAX_ID_CHARS + 50


def test_clip_keeps_head_and_tail() -> None:
    assert clip("short", 10) == "short"
    clipped = clip("HEAD" + "-" * 100 + "TAIL", 10)
    assert clipped.startswith("HEAD-") and clipped.endswith("-TAIL") and "[98 characters cut]" in clipped


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of its own (pytest's capture handlers sit on the root), its handlers removed afterwards."""
    own = logging.getLogger("attnserve.test_log_format")
    own.propagate = False
    yield own
    own.handlers.clear()


def test_json_handler(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(log_handler("json", stream))
    logger.warning("two\nlines", extra={"request_id": "r1"})
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == "two\nlines" and json.loads(line)["request_id"] == "r1"


def test_text_handler_is_the_format_it_was(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(log_handler("text", stream))
    logger.warning("kept", extra={"request_id": "r1"})
    assert TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    assert re.fullmatch(r"\S+ \S+ WARNING attnserve\.test_log_format: kept\n", stream.getvalue()), stream.getvalue()
