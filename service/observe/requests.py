"""Where every request's end is seen once: its metrics and its JSON access-log line.

Both APIs, unary and streamed, wrap their per-request work in `with observer.observe(api, method) as seen:`;
the block fills in the request once decoded and the result once computed, and whatever way it ends
(answer, typed error, bug, cancellation) is recorded with its gRPC status code.

This runs on every request, on the event loop, so it is kept to a few microseconds (`make bench-metrics`):
a plain class instead of a generator context manager, and access-log fields queued per request and
formatted and written in batches twice a second, instead of the logging module and a write per line.

With tracing on (service/observe/tracing.py), the observation also holds the request's server span, and the
span's trace id joins the request id in the histogram's exemplar. With tracing off that costs one `is None`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as json_string
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from service.core.types import AttentionRequest, AttentionResult
from service.observe.metrics import Metrics

if TYPE_CHECKING:  # imported only where tracing is on: with it off, OpenTelemetry is never loaded
    from service.observe.tracing import Headers, Tracing

FLUSH_EVERY_S = 0.5
MAX_PENDING = 4096  # lines queued before a flush happens anyway


class AccessLog:
    """One JSON object per answered request on a text stream (stdout), for log shippers.

    `write` only queues the fields (it runs on the event loop, per request); `flush` formats what is queued
    and writes it in one go, from `flush_periodically` twice a second, when MAX_PENDING lines wait, and at
    shutdown. Every call happens on the event loop's thread."""

    def __init__(self, stream: TextIO, mode: str = "all") -> None:
        self.stream = stream
        self.mode = mode  # all | errors | off
        self._pending: list[tuple] = []

    def wants(self, code: str) -> bool:
        return self.mode == "all" or (self.mode == "errors" and code != "OK")

    def write(
        self, request_id: str, api: str, method: str, code: str, request: AttentionRequest | None,
        result: AttentionResult | None, seconds: float,
    ) -> None:  # fmt: skip
        shape = (request.seq_len, request.batch_size) if request is not None else None
        work = (result.graph, result.timing.queue_s, result.timing.compute_s) if result is not None else None
        self._pending.append((time.time(), request_id, api, method, code, shape, work, seconds))
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        text = "".join(_access_line(*fields) for fields in pending)
        with contextlib.suppress(OSError, ValueError):  # reader gone or stdout closed: lose lines, not the server
            self.stream.write(text)
            self.stream.flush()

    async def flush_periodically(self, every_s: float = FLUSH_EVERY_S) -> None:
        """Until cancelled: lines reach the log within every_s, at one write per interval."""
        while True:
            await asyncio.sleep(every_s)
            self.flush()


def _access_line(
    ts: float, request_id: str, api: str, method: str, code: str, shape: tuple[int, int] | None,
    work: tuple[str, float, float] | None, seconds: float,
) -> str:  # fmt: skip
    seq, batch = shape if shape is not None else ("null", "null")
    if work is None:
        done = '"graph":null,"queue_us":null,"compute_us":null'
    else:
        graph, queue_s, compute_s = work
        done = f'"graph":{json_string(graph)},"queue_us":{round(queue_s * 1e6)},"compute_us":{round(compute_s * 1e6)}'
    return (
        f'{{"ts":{ts:.6f},"request_id":{json_string(request_id)},"api":"{api}","method":"{method}","code":"{code}",'
        f'"seq":{seq},"batch":{batch},{done},"total_us":{round(seconds * 1e6)}}}\n'
    )


class Observation:
    """One request on its way: a context manager that records it when the block ends."""

    __slots__ = ("_request", "api", "method", "observer", "protocol", "result", "span", "started")

    def __init__(
        self, observer: Observer, api: str, method: str, headers: Headers = None, protocol: str = "grpc"
    ) -> None:
        self.observer = observer
        self.api = api  # kserve | v1
        self.method = method  # the rpc
        self.protocol = protocol  # grpc | http: which semantic conventions its trace span follows
        self.started = time.perf_counter()
        self._request: AttentionRequest | None = None
        self.result: AttentionResult | None = None  # once computed
        tracing = observer.tracing
        self.span = None if tracing is None else tracing.start(api, method, headers, protocol)

    @property
    def request(self) -> AttentionRequest | None:
        """The request, once decoded; it carries the span to the engine run that computes it."""
        return self._request

    @request.setter
    def request(self, request: AttentionRequest) -> None:
        self._request = request
        request.trace = self.span

    def __enter__(self) -> Observation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        code = "OK" if error is None else self.observer.code_name(error)
        self.observer.finish(self, code)


class Observer:
    def __init__(
        self, metrics: Metrics, code_name: Callable[[BaseException], str], access_log: AccessLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:  # fmt: skip
        """code_name: the status an error ends its call with, as the edge names it (OK for none)."""
        self.code_name = code_name
        self.metrics = metrics
        self.access_log = access_log
        self.tracing = tracing
        # Server-side ids for requests that bring none, so an exemplar still leads to a log line.
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-"

    def observe(self, api: str, method: str, headers: Headers = None, protocol: str = "grpc") -> Observation:
        """headers: the request's headers, where a W3C traceparent may continue the caller's trace: the gRPC
        edge's `context.invocation_metadata` (read only when tracing is on), or the HTTP edge's header mapping
        (with protocol="http")."""
        return Observation(self, api, method, headers, protocol)

    def refused(self, api: str, method: str, error: BaseException, headers: Headers = None) -> None:
        """A call refused before it became a request (its message undecodable or late): counted all the same."""
        self.finish(Observation(self, api, method, headers), self.code_name(error))

    def finish(self, seen: Observation, code: str) -> None:
        seconds = time.perf_counter() - seen.started
        request = seen.request
        if request is None:
            seq, tokens, request_id = None, 0, ""
        else:
            seq, tokens, request_id = request.seq_len, request.batch_size * request.seq_len, request.request_id
            if code == "CANCELLED" and request.deadline is not None and time.monotonic() >= request.deadline:
                code = "DEADLINE_EXCEEDED"  # gRPC cancels the handler when the deadline passes
        request_id = request_id or f"{self._prefix}{next(self._ids)}"
        trace_id = ""
        if seen.span is not None and self.tracing is not None:
            bucket = self.metrics.seq_bucket(seq)
            trace_id = self.tracing.finish(seen.span, seen.protocol, code, request, seen.result, request_id, bucket)
        self.metrics.observe_request(seen.api, seen.method, code, seq, seconds, tokens, request_id, trace_id)
        if self.access_log is not None and self.access_log.wants(code):
            self.access_log.write(request_id, seen.api, seen.method, code, request, seen.result, seconds)
