"""The way from an accepted request to the engine's threads.

Today every request is its own batch; dynamic batching by sequence-length bucket replaces the inside of
`Batcher.submit` without changing its contract: one awaited call, one answer or one typed error.

Threads: a request alone runs with every core (onnxruntime's intra-op threads). When several are in flight,
short ones run single-threaded side by side on the other workers, while the event loop serves gRPC: on few
cores that gives more answers per second than taking turns with every core (bench/serve_bench.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from service.engine import Engine, EngineOutput
from service.errors import DeadlineExceeded
from service.limits import check_finite
from service.metrics import Metrics, NullMetrics
from service.types import AttentionRequest


class Batcher:
    def __init__(self, engine: Engine, workers: int = 1, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or NullMetrics()
        self.workers = workers
        # onnxruntime releases the GIL while it runs, so these threads compute while the event loop serves gRPC.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")
        self._count_lock = threading.Lock()
        self._waiting = 0  # submitted, not started
        self._running = 0
        self._wide = threading.Lock()  # one all-cores run at a time
        self.runs = {"wide": 0, "narrow": 0}  # how requests ran, for tests and metrics

    async def submit(self, request: AttentionRequest) -> tuple[EngineOutput, float]:
        """(engine output, seconds queued). Raises DeadlineExceeded if the deadline passes before compute."""
        enqueued = time.perf_counter()
        want_probs = request.weights is not None
        may_run_narrow = self.engine.can_run_narrow(request.batch_size * request.seq_len, want_probs)

        def job() -> tuple[EngineOutput, float]:
            with self._count_lock:
                self._waiting -= 1
                self._running += 1
                narrow = may_run_narrow and self._running + self._waiting > 1  # others in flight: share the cores
            try:
                queued = time.perf_counter() - enqueued
                if request.deadline is not None and time.monotonic() >= request.deadline:
                    self.metrics.observe_dropped("deadline")
                    raise DeadlineExceeded(f"deadline passed after {queued * 1e3:.1f} ms in the queue, before compute")
                check_finite(request.hidden_states)
                with self._count_lock:
                    self.runs["narrow" if narrow else "wide"] += 1
                if narrow:
                    output = self.engine.run(request.hidden_states, request.mask, want_probs, narrow=True)
                else:
                    with self._wide:
                        output = self.engine.run(request.hidden_states, request.mask, want_probs)
                # One request per run until batching: no padding added.
                self.metrics.observe_run(
                    self.engine.provider, output.graph, request.batch_size, request.seq_len, 0, output.compute_s
                )
                return output, queued
            finally:
                with self._count_lock:
                    self._running -= 1

        with self._count_lock:
            self._waiting += 1
        future = self._executor.submit(job)
        future.add_done_callback(self._forget_if_cancelled)
        return await asyncio.wrap_future(future)

    def _forget_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # cancelled before it started: the job never ran to count itself out
            with self._count_lock:
                self._waiting -= 1
            self.metrics.observe_dropped("cancelled")

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet started."""
        return self._waiting

    def close(self) -> None:
        """Wait for the runs in progress, if any; nothing new is accepted after this."""
        self._executor.shutdown(wait=True)
