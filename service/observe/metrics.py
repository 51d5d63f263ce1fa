"""Prometheus metrics: every metric defined once, on a registry of its own, served at /metrics.

Latency is labelled by sequence-length bucket (service/core/seq_buckets.py), never by the raw length: attention
costs O(n²·d), so a latency figure means something only within a range of lengths. Durations are in
seconds, with buckets from 50 µs to 30 s. The request histogram carries the request id as an exemplar
(OpenMetrics scrapes only), so a slow bucket on a dashboard leads to one request in the access log.

The request path calls `observe_*` a few times per request; those metrics are service/observe/fast_metrics.py's
(an observation is a bisect and two increments under one lock), the rest prometheus-client's own.
`NullMetrics` is the same interface doing nothing (`--metrics false`), what `make bench-metrics` compares
against.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service import __version__
from service.core.seq_buckets import DEFAULT_SEQ_BUCKETS, seq_bucket
from service.observe.fast_metrics import EXEMPLAR_CHARS, FastCounter, FastHistogram
from service.observe.metrics_http import MetricsHTTPServer

# 50 µs … 30 s: a 16-token request on a GPU to a 4096-token batch on a small CPU.
DURATION_BUCKETS = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BATCH_LABELS = (1, 2, 4, 8, 16, 32)  # batch_bucket label: the smallest bound ≥ the batch, or "+Inf"
PADDING_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0)
disable_created_metrics()  # no *_created series: Prometheus 2.x ignores them, they only add scrape weight
NO_SEQ = "none"  # seq_bucket of a request refused before its length was known
# The request histogram's exemplar: the request id, cut to 64 characters, and for a traced request its trace id
# (32 hex digits, under `trace_id` as Grafana's exemplar-to-trace links expect). Together within OpenMetrics' cap.
REQUEST_ID_CHARS = 64
assert len("request_id") + REQUEST_ID_CHARS + len("trace_id") + 32 <= EXEMPLAR_CHARS

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
        self.request_duration = FastHistogram(
            "attnserve_request_duration_seconds",
            "time from a request's arrival at the servicer to its answer, by API, method, status and length",
            ["api", "method", "code", "seq_bucket"], DURATION_BUCKETS, r,
        )  # fmt: skip
        self.requests = FastCounter(
            "attnserve_requests", "requests answered, by API, method and status code", ["api", "method", "code"], r
        )
        self.queue_duration = FastHistogram(
            "attnserve_queue_duration_seconds", "time a request waited for an engine thread (queue and batching)",
            ["seq_bucket"], DURATION_BUCKETS, r,
        )  # fmt: skip
        self.compute_duration = FastHistogram(
            "attnserve_compute_duration_seconds", "onnxruntime run time of one engine run (one batch)",
            ["provider", "graph", "seq_bucket", "batch_bucket"], DURATION_BUCKETS, r,
        )  # fmt: skip
        self.batch_size = FastHistogram("attnserve_batch_size", "sequences per engine run", [], BATCH_BUCKETS, r)
        self.padding_ratio = FastHistogram(
            "attnserve_padding_ratio", "padded tokens / computed tokens of an engine run (batching pads to the "
            "longest)", [], PADDING_BUCKETS, r,
        )  # fmt: skip
        self.tokens = FastCounter(
            "attnserve_tokens", "tokens of answered requests (batch × sequence length)", ["seq_bucket"], r
        )
        self.dropped = FastCounter(
            "attnserve_dropped_requests", "requests dropped before compute, by reason (deadline, cancelled, "
            "queue_full, memory)", ["reason"], r,
        )  # fmt: skip
        self.inflight = Gauge("attnserve_inflight_requests", "requests accepted and not yet answered", registry=r)
        self.queue_depth = Gauge("attnserve_queue_depth", "requests waiting for an engine thread", registry=r)
        self.model_info = Gauge(
            "attnserve_model_info", "the served model (value 1)",
            ["model", "d_model", "heads", "provider", "weights_sha256"], registry=r,
        )  # fmt: skip
        self.build_info = Gauge("attnserve_build_info", "attnserve build (value 1)", ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self._http: MetricsHTTPServer | None = None

    def seq_bucket(self, seq: int | None) -> str:
        return NO_SEQ if seq is None else seq_bucket(seq, self.seq_buckets)

    # --- the request path -----------------------------------------------------------------------------

    def observe_request(
        self, api: str, method: str, code: str, seq: int | None, seconds: float, tokens: int, request_id: str,
        trace_id: str = "",
    ) -> None:  # fmt: skip
        """One answered request (OK or not); tokens counted only when it was answered OK. trace_id: its trace's id
        when it was traced and sampled, else ""."""
        bucket = self.seq_bucket(seq)
        exemplar = {"request_id": request_id[:REQUEST_ID_CHARS]} if request_id else {}
        if trace_id:
            exemplar["trace_id"] = trace_id
        self.request_duration.observe((api, method, code, bucket), seconds, exemplar)
        self.requests.inc((api, method, code))
        if tokens and code == "OK":
            self.tokens.inc((bucket,), tokens)

    def observe_queue(self, seq: int, seconds: float) -> None:
        self.queue_duration.observe((self.seq_bucket(seq),), seconds)

    def observe_run(self, provider: str, graph: str, batch: int, seq: int, padded_tokens: int, seconds: float) -> None:
        """One engine run: its compute time, batch size and padding share."""
        self.compute_duration.observe((provider, graph, self.seq_bucket(seq), _batch_bucket(batch)), seconds)
        self.batch_size.observe((), batch)
        self.padding_ratio.observe((), padded_tokens / (batch * seq) if seq else 0.0)

    def observe_dropped(self, reason: str) -> None:
        self.dropped.inc((reason,))

    # --- set-up ----------------------------------------------------------------------------------------

    def set_model_info(self, model: str, d_model: int, heads: int, provider: str, weights_sha256: str) -> None:
        self.model_info.labels(model, str(d_model), str(heads), provider, weights_sha256).set(1)

    def track(self, inflight: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        """Read the gauges at scrape time from the core (nothing to update on the request path)."""
        self.inflight.set_function(inflight)
        self.queue_depth.set_function(queue_depth)

    def serve(self, host: str, port: int) -> int:
        """Start /metrics in a thread of its own (service/observe/metrics_http.py); the port (0 picks a free one)."""
        http = MetricsHTTPServer(self.registry)
        port = http.serve(host, port)
        self._http = http
        return port

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


class NullMetrics(Metrics):
    """--no-metrics: the same calls, nothing recorded, no endpoint."""

    enabled = False

    def __init__(self, seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS) -> None:
        self.seq_buckets = tuple(seq_buckets)
        self._http = None

    def observe_request(self, *args: object) -> None:
        pass

    def observe_queue(self, *args: object) -> None:
        pass

    def observe_run(self, *args: object) -> None:
        pass

    def observe_dropped(self, *args: object) -> None:
        pass

    def set_model_info(self, *args: object) -> None:
        pass

    def track(self, *args: object) -> None:
        pass

    def serve(self, host: str, port: int) -> int:
        return 0


def _batch_bucket(batch: int) -> str:
    return next((str(b) for b in BATCH_LABELS if batch <= b), "+Inf")
