"""Histograms and counters cheap enough for the request path, exposed through prometheus-client.

prometheus-client's Histogram takes two locks per observation and validates every exemplar; in the
server, between onnxruntime and gRPC on a small machine, that made the service's metrics cost several
percent of its throughput (`make bench-metrics`). Here an observation is a bisect and two increments under
one uncontended lock, and the work of the exposition format (cumulative buckets, exemplars, label sets)
happens at scrape time, in `collect`, where it belongs.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

# OpenMetrics allows 128 characters in an exemplar's labels, names and values together; Prometheus fails a scrape
# past it. Callers keep within it (service/observe/metrics.py cuts the request id).
EXEMPLAR_CHARS = 128


class _Series:
    __slots__ = ("counts", "exemplars", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0
        self.exemplars: list[tuple[dict[str, str], float, float] | None] = [None] * buckets  # (labels, value, time)


class FastHistogram(Collector):
    """A labelled histogram: observe(labels, value[, exemplar labels]); the latest exemplar kept per bucket."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:  # fmt: skip
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = [float(b) for b in buckets]  # finite upper bounds, increasing
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float, exemplar: dict[str, str] | None = None) -> None:
        index = bisect_left(self.bounds, value)  # the first bound ≥ value: buckets are `le`
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = _Series(len(self.bounds) + 1)
            series.counts[index] += 1
            series.total += value
            if exemplar:
                series.exemplars[index] = (exemplar, value, time.time())

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # a consistent copy, then the formatting outside the lock
            snapshot = [(labels, list(s.counts), s.total, list(s.exemplars)) for labels, s in self._series.items()]
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, counts, total, exemplars in snapshot:
            buckets: list = []
            cumulative = 0
            for bound, count, exemplar in zip([*self.bounds, math.inf], counts, exemplars, strict=True):
                cumulative += count
                le = "+Inf" if math.isinf(bound) else _float_text(bound)
                if exemplar is None:
                    buckets.append((le, cumulative))
                else:
                    buckets.append((le, cumulative, Exemplar(*exemplar)))
            family.add_metric(list(labels), buckets, total)
        yield family


class FastCounter(Collector):
    """A labelled counter: inc(labels[, amount]). `name` without the _total suffix."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = list(self._values.items())
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in snapshot:
            family.add_metric(list(labels), value)
        yield family


def _float_text(value: float) -> str:
    """Bucket bounds as prometheus-client writes them ("0.005", "1.0", "30.0")."""
    return repr(float(value))
