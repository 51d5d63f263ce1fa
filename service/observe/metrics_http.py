"""/metrics over HTTP on an asyncio loop of its own, in one daemon thread, with every client-held resource bounded.

prometheus-client's start_http_server spawns a thread per connection and has no timeouts, so clients that
connect and never finish a request hold threads without bound. Here one thread serves every connection:
the request line and headers must arrive within HEADER_TIMEOUT_S and fit in MAX_HEADER_BYTES, at most
MAX_CONNECTIONS are open (a newcomer at the cap evicts the connection that has waited longest without a
complete request, so a scraper gets through a flood of half-open ones), and an answer must be taken within
WRITE_TIMEOUT_S. One request per connection (Connection: close). The endpoint is unauthenticated: no TLS, no
token; bind it to a private address.

The loop is not the service's: gRPC and onnxruntime's callers use that one, and a scrape (a few ms of
collection) or a flood of connects here must not queue behind them or in front of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 5.0  # a scraper sends its request at once; longer only lets idle sockets pile up
MAX_HEADER_BYTES = 8192  # Prometheus sends ~300 bytes of request line and headers
MAX_CONNECTIONS = 256  # fds and buffers held at once; scrapers need a handful
WRITE_TIMEOUT_S = 10.0  # the answer (~100 KB) to a reader that stalls is dropped after this
BACKLOG = 1024  # kernel queue of connections not yet accepted: a burst of them fills it, then SYNs are dropped
ACCEPT_RETRY_S = 0.1  # out of fds: accept again after this
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PATH = "/metrics"


class MetricsHTTPServer:
    """Serves `registry` at GET /metrics; `serve` starts the thread and listens, `close` stops both."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        self.write_timeout_s = write_timeout_s
        self._open: set[_Connection] = set()
        self._waiting: dict[_Connection, None] = {}  # no complete request yet, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def serve(self, host: str, port: int) -> int:
        """Listen on host:port and serve from a new thread; the bound port (port 0 picks a free one).

        Raises OSError when it can't listen there, before any thread starts."""
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        listener = self._listener = socket.create_server((host, port), family=family, backlog=BACKLOG)
        listener.setblocking(False)
        loop = self._loop = asyncio.new_event_loop()
        loop.set_exception_handler(_log_quietly)
        self._accepting = loop.create_task(self._accept(listener))
        self._thread = threading.Thread(target=loop.run_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return int(listener.getsockname()[1])

    def close(self) -> None:
        """Stop listening, drop every connection, end the thread."""
        if self._loop is None or self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(timeout=5)
        self._stop_loop()

    async def _accept(self, listener: socket.socket) -> None:
        """One connection at a time: each is admitted (and may evict) only once the one before it is set up, so
        a scraper's request, read on the loop's next turn, is not outrun by a burst of accepts evicting it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # out of fds or memory: wait for connections to close rather than spin
                log.debug("metrics http: accept: %s", e)
                await asyncio.sleep(ACCEPT_RETRY_S if e.errno in OUT_OF_RESOURCES else 0)
                continue
            try:
                await loop.connect_accepted_socket(lambda: _Connection(self), sock)
            except OSError:
                sock.close()

    async def _shut(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for connection in list(self._open):
            connection.transport.abort()
        await asyncio.sleep(0)  # lets the aborts' connection_lost run, which closes the sockets

    def _stop_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # --- called by connections, on the loop's thread ---------------------------------------------------

    def _admit(self, connection: _Connection) -> bool:
        if len(self._open) >= self.max_connections:
            if not self._waiting:
                return False  # every slot is writing an answer, each bounded by the write timeout
            oldest = next(iter(self._waiting))
            self._forget(oldest)
            oldest.transport.abort()
        self._open.add(connection)
        self._waiting[connection] = None
        return True

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)

    def _answer(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        """(status, headers, body) for a request's line and headers."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", [], b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", "GET, HEAD")], b"GET /metrics\n"
        if target.split("?", 1)[0] != PATH:
            return "404 Not Found", [], b"GET /metrics\n"
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        try:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
        except (TypeError, ValueError):  # prometheus-client's parser chokes on e.g. `version=abc`
            return "400 Bad Request", [], b"bad Accept header\n"
        try:
            body = encoder(self.registry)
        except Exception:  # a collector's bug, not the client's: worth a traceback
            log.exception("collecting metrics failed")
            return "500 Internal Server Error", [], b"collecting metrics failed\n"
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)  # Prometheus asks for it; several times smaller
            extra.append(("Content-Encoding", "gzip"))
        return "200 OK", extra, body


class _Connection(asyncio.Protocol):
    """One client: read the request head under the header bounds, answer once, close."""

    def __init__(self, server: MetricsHTTPServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP server's transports are Transports
        if not self.server._admit(self):
            self.transport.abort()
            return
        self._deadline(self.server.header_timeout_s, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        start = max(0, len(self.buffer) - 3)  # the terminator may straddle two reads
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n", start)
        if end < 0 and len(self.buffer) <= self.server.max_header_bytes:
            return
        self.answered = True
        self.server._waiting.pop(self, None)  # no longer a candidate for eviction
        self.transport.pause_reading()
        if end < 0 or end > self.server.max_header_bytes:
            status, headers, body = "431 Request Header Fields Too Large", list[tuple[str, str]](), b""
        else:
            status, headers, body = self.server._answer(bytes(self.buffer[:end]))
        head = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        send_body = not self.buffer.startswith(b"HEAD ")
        self.transport.write("\r\n".join(head).encode("latin-1") + (body if send_body else b""))
        self._deadline(self.server.write_timeout_s, self.transport.abort)
        self.transport.close()  # after the buffer drains; connection_lost follows

    def eof_received(self) -> bool:
        return False  # the client stopped sending before a complete request: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server._forget(self)

    def _deadline(self, seconds: float, then: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, then)


def _log_quietly(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A socket error (a reset connection, an accept out of fds) is a client's doing: one debug line, not the
    traceback asyncio would log. Anything else is a bug here and keeps asyncio's report."""
    if isinstance(context.get("exception"), OSError):
        log.debug("metrics http: %s: %s", context.get("message"), context["exception"])
    else:
        loop.default_exception_handler(context)
