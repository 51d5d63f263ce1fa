"""Prometheus metrics on their own registry, served at /metrics on the metrics port.

Latency histograms by sequence-length bucket arrive with the observability work; the endpoint, the
registry, build/model info and the process collectors start here.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, Info, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service import __version__


class Metrics:
    """Every metric, defined once on a registry of its own (tests start many servers in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.build_info = Info("attnserve_build", "attnserve build", registry=self.registry)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self.model_info = Info("attnserve_model", "the served model", registry=self.registry)
        self.inflight = Gauge(
            "attnserve_inflight_requests", "requests accepted and not yet answered", registry=self.registry
        )
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set_model_info(self, d_model: int, heads: int, provider: str, weights_sha256: str) -> None:
        self.model_info.info(
            {"d_model": str(d_model), "heads": str(heads), "provider": provider, "weights_sha256": weights_sha256}
        )

    def track_inflight(self, count: Callable[[], float]) -> None:
        """Read the in-flight count at scrape time from the core (no update on the request path)."""
        self.inflight.set_function(count)

    def serve(self, host: str, port: int) -> int:
        """Start /metrics in a thread of its own; returns the port (port 0 picks a free one)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
