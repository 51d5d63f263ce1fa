"""The main log (stderr): the human text format, or one JSON object per line for log shippers (--log-format).

The access log (service/observe/requests.py, stdout) is separate: it is written per request on the event loop and
formats its own lines; this one goes through the logging module, where a few microseconds per record do not matter.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_MESSAGE_CHARS = 8 * 1024  # a message may quote a client's string: no record becomes a huge line
MAX_ID_CHARS = 256  # request and trace ids come from clients too
CORRELATION_FIELDS = ("request_id", "trace_id")  # taken from a record's `extra` when present


def clip(text: str, limit: int) -> str:
    """text, or its head and tail around a marker saying how much was cut, at most about `limit` characters:
    the head says what happened, the tail of a traceback says which exception."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} …[{len(text) - 2 * half} characters cut]… {text[-half:]}"


def rfc3339_utc(created: float) -> str:
    """A record's time as RFC 3339 in UTC with milliseconds, e.g. 2026-12-03T12:16:17.904Z."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, always on one line: time, level, logger, message; request_id and trace_id
    when the record has them; the traceback as `exception`. json.dumps escapes newlines and control characters
    (and, ASCII-only, every non-ASCII one), so no message can break a line or the JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": clip(record.getMessage(), MAX_MESSAGE_CHARS),
        }
        for name in CORRELATION_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = clip(str(value), MAX_ID_CHARS)
        if record.exc_info:
            entry["exception"] = clip(self.formatException(record.exc_info), MAX_MESSAGE_CHARS)
        elif record.exc_text:  # a record formatted before, or rebuilt from elsewhere, keeps only the text
            entry["exception"] = clip(record.exc_text, MAX_MESSAGE_CHARS)
        if record.stack_info:
            entry["stack"] = clip(self.formatStack(record.stack_info), MAX_MESSAGE_CHARS)
        return json.dumps(entry, separators=(",", ":"))  # compact, as the access log


def log_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to stream (stderr when None) in log_format."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(log_format: LogFormat, level: str) -> None:
    """The root logger writes to stderr in log_format, at level. Like logging.basicConfig, it leaves a root logger
    that already has handlers as it is (a test runner's), apart from its level."""
    logging.basicConfig(handlers=[log_handler(log_format)])
    logging.getLogger().setLevel(level)
    # warnings.warn writes raw lines to stderr; in JSON they must be records too. Text keeps Python's own lines.
    logging.captureWarnings(log_format == "json")
