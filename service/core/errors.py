"""Typed errors of the core. The edges turn them into gRPC and HTTP statuses in one place (service/api/status.py)."""

from __future__ import annotations

SHOWN_CHARS = 64  # of a client's string quoted in an error message


def shown(text: str) -> str:
    """A client's string as an error message quotes it: repr, cut short, so no message echoes megabytes."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}… ({len(text.encode(errors='replace'))} bytes)"


class ServiceError(Exception):
    """Base of every error we raise on purpose; the message says what was wrong and what is allowed."""


class InvalidInput(ServiceError):
    """The client's request is malformed or outside the limits."""


class TooLarge(InvalidInput):
    """The request's body is over its size bound (gRPC: INVALID_ARGUMENT; HTTP: 413)."""


class NotFound(ServiceError):
    """Unknown model or version."""


class Unavailable(ServiceError):
    """Not ready yet, or draining."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed, or cannot be met."""


class BodyTimeout(DeadlineExceeded):
    """The request's body did not arrive within body_timeout_s: the client's delay, not ours (HTTP: 408)."""


class ResourceExhausted(ServiceError):
    """The queue is full: retry later (after retry_after_s, the server's guess), or on another replica."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(ServiceError):
    """Missing or wrong credentials."""


class SettingsError(Exception):
    """A setting names something unusable: an empty token, a file that cannot be read (a start-up failure)."""


class ModelDirectoryError(Exception):
    """The model directory is missing, malformed or does not match its config.json (a start-up failure)."""


class ProviderError(Exception):
    """The requested onnxruntime execution provider cannot be used (a start-up failure)."""


class ListenError(Exception):
    """A port cannot be listened on (a start-up failure)."""
