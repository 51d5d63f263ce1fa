"""The one place where errors become statuses: gRPC status codes, and HTTP statuses for the REST edge."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.core import errors

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
# The same errors over HTTP; a subclass found first in an error's MRO wins (a late body is the client's delay: 408,
# not 504, which says an upstream server was late; a body over its bound: 413). Anything else: 500.
HTTP_STATUSES: dict[type[errors.ServiceError], int] = {
    errors.InvalidInput: 400,
    errors.TooLarge: 413,
    errors.NotFound: 404,
    errors.Unavailable: 503,
    errors.DeadlineExceeded: 504,
    errors.BodyTimeout: 408,
    errors.ResourceExhausted: 429,
    errors.Unauthenticated: 401,
}


def code_of(error: BaseException) -> grpc.StatusCode:
    """The status code an exception ends its call with (nothing logged: status_of does that)."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED  # the client went away (or the server is stopping)
    return next((code for kind, code in STATUS_CODES.items() if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


MAX_MESSAGE_CHARS = 1000  # a status message stays under 1 KiB, whatever the client sent


def code_name(error: BaseException) -> str:
    """The name of the status code an exception ends its call with, as metrics and the access log label it."""
    return code_of(error).name


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """(code, message) for any exception; only our own bugs become INTERNAL, and those are logged."""
    code = code_of(error)
    if code != grpc.StatusCode.INTERNAL:
        message = str(error)
        return code, message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
    log.error("internal error", exc_info=error)
    return code, f"internal error ({type(error).__name__}); the server logged the details"


def trailers_of(error: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for an error: a full queue tells retrying clients when to come back
    (gRPC's retry pushback: clients with a retry policy wait that long before their next attempt)."""
    if isinstance(error, errors.ResourceExhausted):
        return (("grpc-retry-pushback-ms", str(max(1, round(error.retry_after_s * 1e3)))),)
    return ()


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: Handler) -> Handler:
    """Wrap a unary servicer method: any exception ends the call with its mapped status."""

    @functools.wraps(method)
    async def wrapper(self: object, request: object, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as error:
            code, message = status_of(error)
            await context.abort(code, message, trailers_of(error))

    return wrapper  # type: ignore[return-value]  # same call signature as method: functools.wraps keeps it


def http_status_of(error: Exception) -> tuple[int, str, dict[str, str]]:
    """(HTTP status, message, headers) for any exception, with the message status_of gives it: a full port or
    queue says when to come back (Retry-After, whole seconds), a refused token how to authenticate."""
    _, message = status_of(error)
    status = next((HTTP_STATUSES[kind] for kind in type(error).__mro__ if kind in HTTP_STATUSES), 500)
    headers: dict[str, str] = {}
    if isinstance(error, errors.ResourceExhausted):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    elif isinstance(error, errors.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return status, message, headers
