"""The protocol-neutral core both APIs call: check, queue, compute, shape the answer, count."""

from __future__ import annotations

import asyncio
import time

from service.core.describe import Batching, ModelDescription, Route
from service.core.errors import ResourceExhausted, Unavailable
from service.core.limits import Limits, check_request, request_bytes
from service.core.memory_budget import MemoryBudget
from service.core.types import AttentionRequest, AttentionResult, Timing
from service.engine.batcher import Batcher
from service.observe.metrics import Metrics, NullMetrics

MIB = 1 << 20


class DataPlane:
    def __init__(
        self, batcher: Batcher, limits: Limits, metrics: Metrics | None = None, budget: MemoryBudget | None = None
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics or NullMetrics()
        self.limits = limits
        self.budget = budget or MemoryBudget(1 << 62)
        self.description = describe(batcher, limits)  # what metadata, config and model info say
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


def describe(batcher: Batcher, limits: Limits) -> ModelDescription:
    """The served model as the engine, the batching policy and the limits make it."""
    engine, policy = batcher.engine, batcher.policy
    model = engine.model
    routes = tuple(
        Route(masked, route.up_to, route.graph, model.graphs[route.graph].form)
        for masked, table in sorted(model.routing[engine.provider].items())
        for route in table
    )
    batching = Batching(
        max_sequences=policy.max_batch_size,
        max_queue_delay_us=round(policy.max_queue_delay_s * 1e6),
        max_queue_requests=policy.max_queue_requests,
        summary=policy.describe(),
    )
    return ModelDescription(
        d_model=model.d_model,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        causal=model.causal,
        provider=engine.provider,
        instances=batcher.workers,
        routes=routes,
        weights_kind=model.weights_kind,
        weights_sha256=model.weights_sha256,
        weights_detail=model.weights_detail,
        limits=limits,
        batching=batching,
    )
