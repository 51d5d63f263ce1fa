"""The way from an accepted request to the engine's threads: the dynamic batcher's scheduling.

`submit` queues a request (service/engine/batching.py decides which run together) and awaits its own answer. The
scheduling runs on the event loop, driven by events rather than a loop of its own: a request arriving, a run
finishing, or the queue delay of the oldest request running out starts every batch a free engine thread can
take. Checking the values, padding, running and splitting happen on the engine threads (onnxruntime releases
the GIL), answering happens back on the loop.

Before compute, a request whose deadline passed, whose client went away, or whose deadline cannot be met
given its bucket's recent compute time, is dropped and counted. A run whose every request was cancelled is
stopped (onnxruntime's RunOptions.terminate).

Threads: a run alone uses every core (onnxruntime's intra-op threads). When several are in flight, small
ones run single-threaded side by side on the other engine threads, while the event loop serves gRPC: on
few cores that gives more answers per second than taking turns with every core (bench/serve_bench.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.core.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from service.core.limits import check_finite, check_output, weights_rows_per_run
from service.core.types import AttentionRequest, WeightsResult, WeightsSpec
from service.core.weights_view import select_weights
from service.engine.batching import Batch, BatchPolicy, BatchQueue, QueueFull, RunTimes, Waiting, assemble
from service.engine.sessions import Engine, RunControl
from service.host.thread_priority import start_engine_thread
from service.observe.metrics import Metrics, NullMetrics
from service.observe.runs import RunRecorder
from service.observe.stats import ModelStats

# A request computed on the loop's thread uses one intra-op thread up to this many tokens, and computes there even
# when other calls are in progress: at (1,16,512) waking a second thread costs more CPU than it saves time, and a
# hop to an engine thread and back about as much as the compute (bench/serve_bench.py).
INLINE_SINGLE_THREAD_TOKENS = 32


@dataclass(frozen=True)
class Computed:
    """What a run computed for its batch, or a request's share of it: output rows, the weights a weights request
    asked for (those run alone), the graph, and the run's compute time."""

    output: np.ndarray  # (B, S, D) float32
    weights: WeightsResult | None
    graph: str
    compute_s: float


@dataclass(eq=False)  # each run is itself: hashed by identity
class Run:
    """One batch on an engine thread, and what is known of it while it runs."""

    members: list[Waiting]
    narrow: bool
    control: RunControl | None = None  # engine-thread runs only: lets the loop stop a run nobody waits for
    batch: Batch | None = None  # set by the engine thread once the valid members are assembled
    failed: dict[int, ServiceError] = field(default_factory=dict)  # member index -> why it was left out

    @property
    def weights(self) -> bool:
        """A weights request's run (those run alone, all cores, for long)."""
        return self.members[0].request.weights is not None


class Batcher:
    def __init__(
        self,
        engine: Engine,
        policy: BatchPolicy | None = None,
        workers: int = 1,
        metrics: Metrics | None = None,
        stats: ModelStats | None = None,
        nice: int = 0,
        inline_max_tokens: int = 0,
    ) -> None:
        """nice: how far below the event loop the engine threads run (service/host/thread_priority.py)."""
        self.engine = engine
        self.policy = policy or BatchPolicy()
        self.metrics = metrics or NullMetrics()
        self.stats = stats or ModelStats()
        self.workers = workers
        self.queue = BatchQueue(self.policy)
        self.run_times = RunTimes(self.policy.seq_buckets)
        self.recorder = RunRecorder(self.metrics, self.stats, self.run_times)
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="engine", initializer=start_engine_thread, initargs=(nice,)
        )
        self._free_workers = workers
        self._running: set[Run] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._schedule_due = False
        self._wide = threading.Lock()  # one all-cores run at a time
        self.runs = {"wide": 0, "narrow": 0, "inline": 0}  # how batches ran, for tests and metrics
        self.inline_max_tokens = inline_max_tokens
        # Whether the call at hand is alone at the edges (set once they exist): a lone one may compute on the loop.
        self.lone_call: Callable[[], bool] = lambda: True

    async def submit(self, request: AttentionRequest) -> tuple[Computed, float]:
        """(this request's share of its batch's output, seconds queued). Raises ResourceExhausted when the
        queue is full, DeadlineExceeded when the deadline passes (or cannot be met) before compute,
        InvalidInput for non-finite values."""
        if self._closed:
            raise Unavailable("server is stopping; retry on another replica")
        now = time.perf_counter()
        need_s = self.run_times.estimate(request)
        if (late := self._deadline_lost(request, time.monotonic(), need_s, waited_s=0.0)) is not None:
            raise late
        waiting = Waiting(request, now, cost_s=need_s / self.workers)
        if self._can_run_now(waiting):
            return self._run_now(waiting), 0.0
        waiting.tag = asyncio.get_running_loop().create_future()  # only a queued request needs one
        try:
            self.queue.put(waiting)
        except QueueFull as e:
            self.metrics.observe_dropped("queue_full")
            # Retry-pushback: about when the queue has emptied; sooner would likely find it full again.
            raise ResourceExhausted(f"{e}; retry later or on another replica", self.queue.cost_s) from None
        self._schedule_soon()
        computed: tuple[Computed, float] = await waiting.tag
        return computed

    def _can_run_now(self, waiting: Waiting) -> bool:
        """Whether a request computes at once, on the loop's thread: it finds nothing running and nothing waiting,
        and it is either tiny (one intra-op thread: the loop spends on it what an engine thread would, minus the
        hops) or alone at the edges (so holding the loop delays nobody) and small."""
        if self._running or self.queue.requests or waiting.request.weights is not None or self.policy.max_queue_delay_s:
            return False  # (with a queue delay, the policy says wait for company)
        if waiting.tokens > self.inline_max_tokens:
            return False
        return waiting.tokens <= INLINE_SINGLE_THREAD_TOKENS or self.lone_call()

    def _run_now(self, waiting: Waiting) -> Computed:
        """Compute one request here, on the event loop's thread: no hop to an engine thread and back, no thread
        to wake, no future; the loop is held for as long as a small run takes (inline_max_tokens bounds it)."""
        tokens = waiting.tokens
        narrow = tokens <= INLINE_SINGLE_THREAD_TOKENS and self.engine.can_run_narrow(tokens, False)
        run = Run([waiting], narrow)
        self.runs["inline"] += 1
        computed = self._compute(run)
        if run.failed:
            raise run.failed[0]
        assert computed is not None and run.batch is not None
        self._record(run.batch, computed, waiting.enqueued)
        return computed

    @property
    def queue_depth(self) -> int:
        """Requests queued and not yet started."""
        return len(self.queue)

    def close(self) -> None:
        """Answer whatever still waits (UNAVAILABLE), wait for the runs in progress; nothing new is accepted."""
        self._closed = True
        for waiting in self.queue.drain():
            self._answer_error(waiting, Unavailable("server stopped before this request ran; retry elsewhere"))
        self._executor.shutdown(wait=True)

    # Scheduling, on the event loop.

    def _schedule(self) -> None:
        """Start every batch that is ready and has a free engine thread; wake up when the next one is due."""
        while self._free_workers > 0 and len(self.queue):
            weights_running = any(run.weights for run in self._running)
            members = self.queue.take(time.perf_counter(), weights=not weights_running)
            if members is None:
                break
            self._start(members)
        self._arm_timer()

    def _schedule_soon(self) -> None:
        """Schedule once the loop has read what already arrived: requests that came together run together."""
        if not self._schedule_due:
            self._schedule_due = True
            asyncio.get_running_loop().call_soon(self._scheduled)

    def _scheduled(self) -> None:
        self._schedule_due = False
        self._schedule()

    def _arm_timer(self) -> None:
        due = self.queue.next_due() if self._free_workers > 0 else None
        if due is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, due - time.perf_counter())
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= when:
            return  # an earlier wake-up is already armed
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _start(self, members: list[Waiting]) -> None:
        now = time.monotonic()
        live = [w for w in members if self._still_wanted(w, now)]
        if not live:
            return
        tokens = sum(w.tokens for w in live)
        want_probs = live[0].request.weights is not None
        busy = len(self._running) > 0 or len(self.queue) > 0
        run = Run(live, narrow=busy and self.engine.can_run_narrow(tokens, want_probs), control=RunControl())
        self.runs["narrow" if run.narrow else "wide"] += 1
        self._free_workers -= 1
        self._running.add(run)
        for waiting in live:
            waiting.tag.add_done_callback(lambda _, run=run: self._stop_if_abandoned(run))
        self._executor.submit(self._compute_and_report, run, time.perf_counter(), asyncio.get_running_loop())

    def _still_wanted(self, waiting: Waiting, now: float) -> bool:
        """False (and the request answered and counted) when its client left or its deadline is lost."""
        request = waiting.request
        if waiting.tag.cancelled():
            expired = request.deadline is not None and now >= request.deadline
            self.metrics.observe_dropped("deadline" if expired else "cancelled")
            return False
        waited_s = time.perf_counter() - waiting.enqueued
        if (late := self._deadline_lost(request, now, self.run_times.estimate(request), waited_s)) is not None:
            self._answer_error(waiting, late)
            return False
        return True

    def _deadline_lost(
        self, request: AttentionRequest, now: float, need_s: float, waited_s: float
    ) -> DeadlineExceeded | None:
        """The error (counted as a drop) for a request whose deadline passed or is nearer than need_s, the
        compute its length recently needed; None while it can still be met. now: time.monotonic()."""
        if request.deadline is None or request.deadline - now > need_s:
            return None
        self.metrics.observe_dropped("deadline")
        left_s = request.deadline - now
        if left_s <= 0:
            return DeadlineExceeded(f"deadline passed after {waited_s * 1e3:.1f} ms in the queue, before compute")
        return DeadlineExceeded(
            f"deadline cannot be met: {left_s * 1e3:.1f} ms left, and requests of this length recently needed "
            f"{need_s * 1e3:.1f} ms of compute"
        )

    def _stop_if_abandoned(self, run: Run) -> None:
        if run in self._running and run.control is not None and all(w.tag.cancelled() for w in run.members):
            run.control.stop()  # nobody waits for this run: free its engine thread now

    def _compute_and_report(self, run: Run, started: float, loop: asyncio.AbstractEventLoop) -> None:
        """On an engine thread: compute, then hand the outcome to the loop in one callback."""
        try:
            output, error = self._compute(run), None
        except BaseException as e:  # terminated (nobody waits any more), or a bug every member hears of
            output, error = None, e
        loop.call_soon_threadsafe(self._finish, run, started, output, error)

    def _finish(self, run: Run, started: float, output: Computed | None, error: BaseException | None) -> None:
        """Back on the loop: answer every member of the run, its share or the error that left it out; schedule on."""
        self._running.discard(run)
        self._free_workers += 1
        for index, failure in run.failed.items():
            self._answer_error(run.members[index], failure)
        if error is not None:
            if run.control is not None and run.control.stopped:
                for _ in run.members:
                    self.metrics.observe_dropped("cancelled")
            for waiting in run.members:
                self._answer_error(waiting, error)
        elif output is not None and run.batch is not None:
            self._answer(run.batch, output, started)
        self._schedule()

    def _record(self, batch: Batch, output: Computed, started: float) -> None:
        rows, longest = batch.hidden_states.shape[:2]
        self.recorder.record(
            self.engine.provider, output.graph, rows, longest, batch.padded_tokens, output.compute_s,
            batch.members, started,
        )  # fmt: skip

    def _answer(self, batch: Batch, output: Computed, started: float) -> None:
        self._record(batch, output, started)
        for waiting, part in zip(batch.members, batch.split(output.output), strict=True):
            if not waiting.tag.done():
                share = Computed(part, output.weights, output.graph, output.compute_s)
                waiting.tag.set_result((share, started - waiting.enqueued))

    @staticmethod
    def _answer_error(waiting: Waiting, error: BaseException) -> None:
        if not waiting.tag.done():
            waiting.tag.set_exception(error)

    # On an engine thread.

    def _compute(self, run: Run) -> Computed | None:
        """Check each member's values, pad the valid ones into one batch, run it, check each member's answer."""
        valid, indices = [], []  # the members that run, and their indices in run.members
        for index, waiting in enumerate(run.members):
            try:
                check_finite(waiting.request.hidden_states)
                valid.append(waiting)
                indices.append(index)
            except ServiceError as error:  # one bad request fails alone, not its batch
                run.failed[index] = error
        if not valid:
            return None
        batch = run.batch = assemble(valid)
        computed = self._run(batch, run)
        # Finite input can still overflow (float32 inside attention, or FP16 on the way back): such a member fails
        # alone, here on the engine thread; _finish answers the failed first, and _answer skips them.
        for index, waiting, part in zip(indices, valid, batch.split(computed.output), strict=True):
            try:
                check_output(waiting.request, part)
            except ServiceError as error:
                run.failed[index] = error
        return computed

    def _run(self, batch: Batch, run: Run) -> Computed:
        spec = batch.members[0].request.weights
        if run.narrow or run.control is None:
            ran = self.engine.run(batch.hidden_states, batch.mask, False, narrow=run.narrow, control=run.control)
            return Computed(ran.output, None, ran.graph, ran.compute_s)
        with self._wide:
            if spec is not None:
                return self._weights_run(batch, spec, run.control)
            ran = self.engine.run(batch.hidden_states, batch.mask, False, control=run.control)
            return Computed(ran.output, None, ran.graph, ran.compute_s)

    def _weights_run(self, batch: Batch, spec: WeightsSpec, control: RunControl) -> Computed:
        """A weights request, a few sequences per run (limits.weights_rows_per_run), each run's probabilities cut
        down to what the client asked for before the next: memory stays at one run's probabilities."""
        x, mask = batch.hidden_states, batch.mask
        step = weights_rows_per_run(x.shape[1], self.engine.model.num_heads)
        outputs, parts, compute_s, graph = [], [], 0.0, ""
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            ran = self.engine.run(x[rows], None if mask is None else mask[rows], True, control=control)
            assert ran.probs is not None
            outputs.append(ran.output)
            parts.append(select_weights(ran.probs, spec))
            compute_s, graph = compute_s + ran.compute_s, ran.graph
        if len(parts) == 1:
            return Computed(outputs[0], parts[0], graph, compute_s)
        found = [p.indices for p in parts if p.indices is not None]
        indices = np.concatenate(found) if found else None
        values = np.concatenate([p.values for p in parts])
        weights = WeightsResult(parts[0].positions, parts[0].averaged, values, indices)
        return Computed(np.concatenate(outputs), weights, graph, compute_s)
