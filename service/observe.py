"""Where every request's end is seen once: its metrics and its JSON access-log line.

Both APIs, unary and streamed, wrap their per-request work in `Observer.observe(api, method)`; the block
fills in the request once decoded and the result once computed, and whatever way it ends (answer, typed
error, bug, cancellation) is recorded with its gRPC status code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.api.status import code_of
from service.metrics import Metrics
from service.types import AttentionRequest, AttentionResult

ACCESS_LOGGER = "attnserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass
class Observation:
    api: str  # kserve | v1
    method: str  # the rpc
    started: float  # time.perf_counter() at arrival
    request: AttentionRequest | None = None  # once decoded
    result: AttentionResult | None = None  # once computed


class Observer:
    def __init__(self, metrics: Metrics, access: str = "all") -> None:
        self.metrics = metrics
        self.access = access  # all | errors | off
        # Server-side ids for requests that bring none, so an exemplar still leads to a log line.
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-"

    @contextmanager
    def observe(self, api: str, method: str) -> Iterator[Observation]:
        observation = Observation(api, method, time.perf_counter())
        try:
            yield observation
        except (Exception, asyncio.CancelledError) as error:
            self._finish(observation, code_of(error).name)
            raise
        self._finish(observation, "OK")

    def _finish(self, observation: Observation, code: str) -> None:
        seconds = time.perf_counter() - observation.started
        request, result = observation.request, observation.result
        deadline = request.deadline if request is not None else None
        if code == "CANCELLED" and deadline is not None and time.monotonic() >= deadline:
            code = "DEADLINE_EXCEEDED"  # gRPC cancels the handler when the deadline passes
        seq = request.seq_len if request is not None else None
        tokens = request.batch_size * request.seq_len if request is not None else 0
        request_id = (request.request_id if request is not None else "") or f"{self._prefix}{next(self._ids)}"
        self.metrics.observe_request(observation.api, observation.method, code, seq, seconds, tokens, request_id)
        if self.access == "all" or (self.access == "errors" and code != "OK"):
            line = {
                "ts": round(time.time(), 6),
                "request_id": request_id,
                "api": observation.api,
                "method": observation.method,
                "code": code,
                "seq": seq,
                "batch": request.batch_size if request is not None else None,
                "graph": result.graph if result is not None else None,
                "queue_us": round(result.timing.queue_s * 1e6) if result is not None else None,
                "compute_us": round(result.timing.compute_s * 1e6) if result is not None else None,
                "total_us": round(seconds * 1e6),
            }
            access_log.info(json.dumps(line, separators=(",", ":")))
