"""Prometheus metrics: every metric defined once, on a registry of its own, served at /metrics.

Latency is labelled by sequence-length bucket (service/seq_buckets.py), never by the raw length: attention
costs O(n²·d), so a latency figure means something only within a range of lengths. Durations are in
seconds, with buckets from 50 µs to 30 s. The request histogram carries the request id as an exemplar
(OpenMetrics scrapes only), so a slow bucket on a dashboard leads to one request in the access log.

The request path calls `observe_*` a few times per request; label children are cached so that an
observation is a dict lookup and a histogram update. `NullMetrics` is the same interface doing nothing
(`--no-metrics`), which is what `make bench-metrics` compares against.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service import __version__
from service.seq_buckets import DEFAULT_SEQ_BUCKETS, seq_bucket

# 50 µs … 30 s: a 16-token request on a GPU to a 4096-token batch on a small CPU.
DURATION_BUCKETS = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BATCH_LABELS = (1, 2, 4, 8, 16, 32)  # batch_bucket label: the smallest bound ≥ the batch, or "+Inf"
PADDING_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0)
disable_created_metrics()  # no *_created series: Prometheus 2.x ignores them, they only add scrape weight
NO_SEQ = "none"  # seq_bucket of a request refused before its length was known

# What the exposition names, for tests and docs: histograms expose _bucket/_sum/_count, counters _total.
SERVICE_METRICS = (
    "attnserve_request_duration_seconds",
    "attnserve_requests_total",
    "attnserve_queue_duration_seconds",
    "attnserve_compute_duration_seconds",
    "attnserve_batch_size",
    "attnserve_padding_ratio",
    "attnserve_tokens_total",
    "attnserve_dropped_requests_total",
    "attnserve_inflight_requests",
    "attnserve_queue_depth",
    "attnserve_model_info",
    "attnserve_build_info",
)


class Metrics:
    """Every metric of the service. Tests start many servers in one process, hence a registry per instance."""

    enabled = True

    def __init__(self, seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS) -> None:
        self.seq_buckets = tuple(seq_buckets)
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.request_duration = Histogram(
            "attnserve_request_duration_seconds",
            "time from a request's arrival at the servicer to its answer, by API, method, status and length",
            ["api", "method", "code", "seq_bucket"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "attnserve_requests", "requests answered, by API, method and status code", ["api", "method", "code"],
            registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "attnserve_queue_duration_seconds", "time a request waited for an engine thread (queue and batching)",
            ["seq_bucket"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_duration = Histogram(
            "attnserve_compute_duration_seconds", "onnxruntime run time of one engine run (one batch)",
            ["provider", "graph", "seq_bucket", "batch_bucket"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "attnserve_batch_size", "sequences per engine run", buckets=BATCH_BUCKETS, registry=r
        )
        self.padding_ratio = Histogram(
            "attnserve_padding_ratio", "padded tokens / computed tokens of an engine run (batching pads to the "
            "longest)", buckets=PADDING_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "attnserve_tokens", "tokens of answered requests (batch × sequence length)", ["seq_bucket"], registry=r
        )
        self.dropped = Counter(
            "attnserve_dropped_requests", "requests dropped before compute, by reason (deadline, cancelled, "
            "queue_full)", ["reason"], registry=r,
        )  # fmt: skip
        self.inflight = Gauge("attnserve_inflight_requests", "requests accepted and not yet answered", registry=r)
        self.queue_depth = Gauge("attnserve_queue_depth", "requests waiting for an engine thread", registry=r)
        self.model_info = Gauge(
            "attnserve_model_info", "the served model (value 1)",
            ["model", "d_model", "heads", "provider", "weights_sha256"], registry=r,
        )  # fmt: skip
        self.build_info = Gauge("attnserve_build_info", "attnserve build (value 1)", ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self._children: dict[tuple, object] = {}  # label values -> child metric, off the labels() slow path
        self._request_children: dict[tuple[str, str, str, str], tuple] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _child(self, metric: Histogram | Counter, *labels: str) -> Histogram | Counter:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    def seq_bucket(self, seq: int | None) -> str:
        return NO_SEQ if seq is None else seq_bucket(seq, self.seq_buckets)

    # --- the request path -----------------------------------------------------------------------------

    def observe_request(
        self, api: str, method: str, code: str, seq: int | None, seconds: float, tokens: int, request_id: str
    ) -> None:
        """One answered request (OK or not); tokens counted only when it was answered OK."""
        bucket = self.seq_bucket(seq)
        key = (api, method, code, bucket)
        children = self._request_children.get(key)
        if children is None:  # first request of its kind: one labels() lookup, then cached
            tokens_child = self.tokens.labels(bucket) if code == "OK" else None
            children = (self.request_duration.labels(*key), self.requests.labels(api, method, code), tokens_child)
            self._request_children[key] = children
        duration, count, tokens_total = children
        duration.observe(seconds, {"request_id": request_id[:64]} if request_id else None)  # OpenMetrics caps it
        count.inc()
        if tokens and tokens_total is not None:
            tokens_total.inc(tokens)

    def observe_queue(self, seq: int, seconds: float) -> None:
        self._child(self.queue_duration, self.seq_bucket(seq)).observe(seconds)  # type: ignore[union-attr]

    def observe_run(self, provider: str, graph: str, batch: int, seq: int, padded_tokens: int, seconds: float) -> None:
        """One engine run: its compute time, batch size and padding share."""
        labels = (provider, graph, self.seq_bucket(seq), _batch_bucket(batch))
        self._child(self.compute_duration, *labels).observe(seconds)  # type: ignore[union-attr]
        self.batch_size.observe(batch)
        self.padding_ratio.observe(padded_tokens / (batch * seq) if seq else 0.0)

    def observe_dropped(self, reason: str) -> None:
        self._child(self.dropped, reason).inc()

    # --- set-up ----------------------------------------------------------------------------------------

    def set_model_info(self, model: str, d_model: int, heads: int, provider: str, weights_sha256: str) -> None:
        self.model_info.labels(model, str(d_model), str(heads), provider, weights_sha256).set(1)

    def track(self, inflight: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        """Read the gauges at scrape time from the core (nothing to update on the request path)."""
        self.inflight.set_function(inflight)
        self.queue_depth.set_function(queue_depth)

    def serve(self, host: str, port: int) -> int:
        """Start /metrics in a thread of its own; returns the port (port 0 picks a free one)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class NullMetrics(Metrics):
    """--no-metrics: the same calls, nothing recorded, no endpoint."""

    enabled = False

    def __init__(self, seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS) -> None:
        self.seq_buckets = tuple(seq_buckets)
        self._http = None

    def observe_request(self, *args: object) -> None:  # type: ignore[override]
        pass

    def observe_queue(self, *args: object) -> None:  # type: ignore[override]
        pass

    def observe_run(self, *args: object) -> None:  # type: ignore[override]
        pass

    def observe_dropped(self, *args: object) -> None:  # type: ignore[override]
        pass

    def set_model_info(self, *args: object) -> None:  # type: ignore[override]
        pass

    def track(self, *args: object) -> None:  # type: ignore[override]
        pass

    def serve(self, host: str, port: int) -> int:
        return 0


def _batch_bucket(batch: int) -> str:
    return next((str(b) for b in BATCH_LABELS if batch <= b), "+Inf")
