"""The protocol-neutral core both APIs call: check, queue, compute, shape the answer, count."""

from __future__ import annotations

import asyncio
import time

from service.batcher import Batcher
from service.errors import ResourceExhausted, Unavailable
from service.limits import Limits, check_request, request_bytes
from service.memory_budget import MemoryBudget
from service.metrics import Metrics, NullMetrics
from service.types import AttentionRequest, AttentionResult, Timing

MIB = 1 << 20


class DataPlane:
    def __init__(
        self, batcher: Batcher, limits: Limits, metrics: Metrics | None = None, budget: MemoryBudget | None = None
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics or NullMetrics()
        self.limits = limits
        self.budget = budget or MemoryBudget(1 << 62)
        self.stats = batcher.stats  # per request here, per engine run in the batcher
        self.ready = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def attend(self, request: AttentionRequest) -> AttentionResult:
        """The answer to one request, or a ServiceError saying what was wrong."""
        arrived = time.perf_counter()
        if not self.ready:
            raise Unavailable("server is not ready (warming up or draining); retry, or use another replica")
        self.inflight += 1
        self._idle.clear()
        held = 0
        try:
            check_request(request, self.limits)
            held = self._reserve(request)
            checked = time.perf_counter()
            engine_output, queue_s = await self.batcher.submit(request)
            self.metrics.observe_queue(request.seq_len, queue_s)
            shaping = time.perf_counter()
            output = engine_output.output
            if output.dtype != request.output_dtype:
                output = output.astype(request.output_dtype)
            done = time.perf_counter()
            timing = Timing(queue_s, engine_output.compute_s, done - arrived)
            self.stats.record_success(request.batch_size, timing, checked - arrived, done - shaping)
            return AttentionResult(output, engine_output.weights, engine_output.graph, timing)
        except Exception:  # typed or not, a failed request is counted
            self.stats.record_failure(time.perf_counter() - arrived)
            raise
        finally:
            self.budget.give(held)
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    def _reserve(self, request: AttentionRequest) -> int:
        """Take the request's bytes from the memory budget, or refuse it while requests in progress hold it."""
        need = request_bytes(request, self.limits)
        if not self.budget.take(need):
            self.metrics.observe_dropped("memory")
            raise ResourceExhausted(
                f"memory budget full: requests in progress hold {self.budget.used / MIB:.0f} of "
                f"{self.budget.total / MIB:.0f} MiB and this one needs {need / MIB:.1f} MiB; retry later, send "
                "smaller requests, or use another replica",
                retry_after_s=max(0.05, self.batcher.queue.cost_s),
            )
        return need

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if timeout_s passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
