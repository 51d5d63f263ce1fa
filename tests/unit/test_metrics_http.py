"""The /metrics HTTP server (service/metrics_http.py) on loopback, serving the real Metrics registry: formats,
errors, and its bounds against clients that connect and never finish a request or never read the answer."""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.metrics import Metrics
from service.metrics_http import MetricsHTTPServer

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def _get(port: int, path: str = "/metrics", method: str = "GET", timeout: float = 5.0, **headers: str) -> tuple:
    """(status, headers, body) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _raw(port: int, data: bytes) -> bytes:
    """What the server answers to `data`, up to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _closed_by_server(s: socket.socket) -> bool:
    """The server closed `s` (EOF or reset) without sending anything; False while it is still open."""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def metrics() -> Iterator[tuple[Metrics, int]]:
    m = Metrics((16, 64))
    port = m.serve("127.0.0.1", 0)
    yield m, port
    m.close()


def test_a_scrape_speaks_text_or_openmetrics_as_asked_with_exemplars_in_openmetrics(
    metrics: tuple[Metrics, int],
) -> None:
    m, port = metrics
    m.observe_request("v1", "Attend", "OK", 40, 0.003, 40, "req-7")
    status, headers, body = _get(port)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"attnserve_build_info{" in body and b"# {request_id" not in body
    status, headers, body = _get(port, Accept=OPENMETRICS)
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert b'# {request_id="req-7"} 0.003' in body and body.endswith(b"# EOF\n")
    status, headers, zipped = _get(port, Accept=OPENMETRICS, Accept_Encoding="gzip")
    assert headers["Content-Encoding"] == "gzip" and b"attnserve_build_info{" in gzip.decompress(zipped)
    status, headers, body = _get(port, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_only_get_metrics_is_served(metrics: tuple[Metrics, int]) -> None:
    _, port = metrics
    assert _get(port, "/")[0] == 404 and _get(port, "/metricsx")[0] == 404
    assert _get(port, "/metrics?name[]=x")[0] == 200
    status, headers, _ = _get(port, method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert _raw(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(port, b"GET /metrics HTTP/1.1\r\nAccept: text/plain;version=x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000).startswith(b"HTTP/1.1 431 ")


def test_close_stops_the_thread_and_the_listener() -> None:
    m = Metrics()
    before = threading.active_count()
    port = m.serve("127.0.0.1", 0)
    assert threading.active_count() == before + 1
    m.close()
    assert threading.active_count() == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_port_taken_is_an_oserror_and_leaves_no_thread() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = threading.active_count()
        with pytest.raises(OSError):
            MetricsHTTPServer(CollectorRegistry()).serve("127.0.0.1", taken.getsockname()[1])
        assert threading.active_count() == before


def test_a_connection_that_never_finishes_its_request_is_closed_after_the_header_timeout() -> None:
    server = MetricsHTTPServer(Metrics().registry, header_timeout_s=0.3)
    port = server.serve("127.0.0.1", 0)
    try:
        for sent in (b"", b"GET /metr"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                started = time.monotonic()
                s.sendall(sent)
                assert s.recv(1) == b"", "the server sends nothing, then closes"
                assert 0.3 <= time.monotonic() - started < 2.0
    finally:
        server.close()


def test_a_flood_of_half_open_connections_neither_stops_scrapes_nor_adds_threads() -> None:
    cap, flood = 256, 600
    server = MetricsHTTPServer(Metrics().registry, header_timeout_s=30.0, max_connections=cap)
    port = server.serve("127.0.0.1", 0)
    threads = threading.active_count()
    held: list[socket.socket] = []
    try:
        for i in range(flood):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(b"GET /metr")  # half a request line
            held.append(s)
        # Each newcomer past the cap evicts the one that has waited longest: the first flood - cap go.
        deadline = time.monotonic() + 10
        while sum(map(_closed_by_server, held[: flood - cap])) < flood - cap:
            assert time.monotonic() < deadline, "the oldest half-open connections were not evicted"
        assert not any(map(_closed_by_server, held[flood - cap :])), "only the oldest are evicted"
        assert server.open_connections == cap
        for _ in range(5):
            started = time.monotonic()
            status, _, body = _get(port, timeout=1.0)
            assert status == 200 and b"attnserve_build_info{" in body
            assert time.monotonic() - started < 1.0
        assert threading.active_count() == threads, "one thread serves every connection"
        assert server.open_connections <= cap
    finally:
        for s in held:
            s.close()
        server.close()


def test_a_burst_of_connections_behind_a_scrape_does_not_evict_it() -> None:
    cap, burst = 64, 300
    server = MetricsHTTPServer(Metrics().registry, max_connections=cap)
    port = server.serve("127.0.0.1", 0)
    frozen, thaw = threading.Event(), threading.Event()
    # White-box: hold the server's loop so the scrape and the burst wait together in the kernel's accept queue;
    # accepted all at once, the burst would be admitted before the scrape's request is read, and evict it.
    server._loop.call_soon_threadsafe(lambda: (frozen.set(), thaw.wait(10)))  # type: ignore[union-attr]
    assert frozen.wait(5)
    held: list[socket.socket] = []
    try:
        scrape = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.append(scrape)
        scrape.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        held += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(burst)]
        thaw.set()
        assert scrape.recv(16).startswith(b"HTTP/1.1 200")
    finally:
        thaw.set()
        for s in held:
            s.close()
        server.close()


class _Big(Collector):
    """A 20 MB exposition, far more than the socket buffers hold: a client that never reads leaves most unsent."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("big", "padding", labels=["i"])
        for i in range(2000):
            family.add_metric([f"{i}{'x' * 10_000}"], i)
        yield family


def test_an_answer_nobody_reads_is_dropped_after_the_write_timeout() -> None:
    registry = CollectorRegistry()
    registry.register(_Big())
    server = MetricsHTTPServer(registry, write_timeout_s=0.5)
    port = server.serve("127.0.0.1", 0)
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no window to autotune
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert s.recv(16, socket.MSG_PEEK).startswith(b"HTTP/1.1 200"), "the answer has started"
            answered = time.monotonic()
            assert server.open_connections == 1, "held while the rest of the answer waits to be read"
            while server.open_connections:
                assert time.monotonic() - answered < 5, "a stalled reader holds its connection"
                time.sleep(0.02)
            assert time.monotonic() - answered >= 0.4
            received = 0
            while chunk := s.recv(1 << 20):  # what the kernel had taken, then the end: the rest was dropped
                received += len(chunk)
            assert received < 20_000_000
    finally:
        server.close()
