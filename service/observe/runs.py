"""Where every engine run is seen once: its metrics, the model statistics, the compute-time estimates that bound the
queue's wait, and with tracing on its spans (service/observe/tracing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from service.observe.metrics import Metrics
from service.observe.stats import ModelStats

if TYPE_CHECKING:  # imported only where tracing is on: with it off, OpenTelemetry is never loaded
    from service.observe.tracing import Member, Tracing


class Estimates(Protocol):
    """What learns from runs' times (service/engine/batching.py RunTimes)."""

    def record(self, seq_len: int, rows: int, seconds: float) -> None: ...


class RunRecorder:
    def __init__(self, metrics: Metrics, stats: ModelStats, estimates: Estimates) -> None:
        self.metrics = metrics
        self.stats = stats
        self.estimates = estimates
        self.tracing: Tracing | None = None  # set by the server when tracing is on

    def record(
        self, provider: str, graph: str, rows: int, longest: int, padded_tokens: int, compute_s: float,
        members: Sequence[Member] = (), started: float = 0.0,
    ) -> None:  # fmt: skip
        """One run of `rows` sequences padded to `longest` tokens, `padded_tokens` of them padding, called on the
        event loop as it ends. members: the requests it served; started: time.perf_counter() when it went to an
        engine thread (or computed at once)."""
        self.metrics.observe_run(provider, graph, rows, longest, padded_tokens, compute_s)
        self.stats.record_run(rows, compute_s)
        self.estimates.record(longest, rows, compute_s)
        if self.tracing is not None:
            self.tracing.record_run(members, started, provider, graph, rows, longest, padded_tokens, compute_s)
