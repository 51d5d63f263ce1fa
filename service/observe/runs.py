"""Where every engine run is seen once: its metrics, the model statistics, and the compute-time estimates that
bound the queue's wait."""

from __future__ import annotations

from typing import Protocol

from service.observe.metrics import Metrics
from service.observe.stats import ModelStats


class Estimates(Protocol):
    """What learns from runs' times (service/engine/batching.py RunTimes)."""

    def record(self, seq_len: int, rows: int, seconds: float) -> None: ...


class RunRecorder:
    def __init__(self, metrics: Metrics, stats: ModelStats, estimates: Estimates) -> None:
        self.metrics = metrics
        self.stats = stats
        self.estimates = estimates

    def record(self, provider: str, graph: str, rows: int, longest: int, padded_tokens: int, compute_s: float) -> None:
        """One run of `rows` sequences padded to `longest` tokens, `padded_tokens` of them padding."""
        self.metrics.observe_run(provider, graph, rows, longest, padded_tokens, compute_s)
        self.stats.record_run(rows, compute_s)
        self.estimates.record(longest, rows, compute_s)
