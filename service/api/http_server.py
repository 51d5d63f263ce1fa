"""KServe v2 (Open Inference Protocol) over HTTP/REST, on aiohttp's low-level server, on the gRPC server's
event loop: routes to a few lines each around the same DataPlane, with the gRPC port's bounds.

Per request, in order: the route; the bearer token from the headers (health live/ready are open, like gRPC
health Check); a call slot shared with the gRPC port (CallGate.take_slot); a body over max_message_bytes is
refused by Content-Length before it is read, and while it is read; the body is due body_timeout_s after the
headers (408: the client's delay). Headers are bounded by aiohttp (line, field and count), a connection that
sends no complete request within body_timeout_s of connecting or of its last answer is closed (keep-alive
timeout), and connections past max_connections are answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from service import __version__
from service.api import http_codec as codec
from service.api import kserve_codec
from service.api.body_deadlines import BodyDeadlines, BodyLate
from service.api.gate import CallGate
from service.api.status import http_status_of
from service.core.dataplane import DataPlane
from service.core.errors import BodyTimeout, DeadlineExceeded, NotFound, TooLarge, Unauthenticated
from service.observe.requests import Observer

SERVER_NAME = "attnserve"
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
API = "http"  # the metrics' and access log's api label
MAX_LINE_BYTES = 8 * 1024  # request line and each header line
MAX_HEADERS = 64
OFFLOAD_BYTES = 256 * 1024  # JSON bigger than this is parsed and written on a thread, not on the event loop
JSON_TYPE = "application/json"
_HOW_TO_AUTH = "send `Authorization: Bearer <token>` with the server's token"


@dataclass(frozen=True)
class HttpPolicy:
    token: str | None  # None: no authentication
    max_body_bytes: int  # max_message_bytes
    body_timeout_s: float
    max_connections: int


def _json(status: int, value: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(value).encode(), content_type=JSON_TYPE, headers=headers)


def error_response(error: Exception) -> web.Response:
    status, message, headers = http_status_of(error)
    response = _json(status, {"error": message}, headers)
    if isinstance(error, TooLarge | BodyTimeout):
        response.force_close()  # the rest of the body is not read: the connection cannot carry another request
    return response


class HttpEdge:
    """The routes of the v2 REST API."""

    def __init__(
        self, dataplane: DataPlane, model_name: str, observer: Observer, gate: CallGate, policy: HttpPolicy
    ) -> None:
        self.dataplane = dataplane
        self.name = model_name
        self.observer = observer
        self.gate = gate
        self.policy = policy
        self._expected = None if policy.token is None else f"Bearer {policy.token}"
        self._max_json = policy.max_body_bytes // codec.JSON_EXPANSION
        self._bodies = BodyDeadlines(policy.body_timeout_s)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            route = self._route(request)
            if route is None:  # health: no token, no slot, so probes answer while the port is full
                return self._health(request.path)
            self._authenticate(request)
            if (busy := self.gate.take_slot()) is not None:
                if request.method == "POST":
                    self.observer.refused(API, "infer", busy)
                raise busy
            try:
                return await route()
            finally:
                self.gate.give_slot()
        except Exception as error:
            return error_response(error)

    def _route(self, request: web.BaseRequest) -> Callable[[], Awaitable[web.StreamResponse]] | None:
        """The handler of the request's method and path; None for the open health routes."""
        parts = request.path.strip("/").split("/")
        method = request.method
        if parts[:2] == ["v2", "health"] and len(parts) == 3 and parts[2] in ("live", "ready"):
            return None if method in ("GET", "HEAD") else self._not_allowed(method, "GET")
        if parts == ["v2"]:
            return self._get(method, self._server_metadata)
        if parts == ["v2", "models", "stats"]:
            return self._get(method, lambda: self._stats("", ""))
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            raise NotFound(f"no route for {method} {request.path[:200]!r}; the API is KServe v2 under /v2")
        name, rest, version = parts[2], parts[3:], ""
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        tail = rest[0] if len(rest) == 1 else "" if not rest else None
        if tail == "infer":
            if method != "POST":
                return self._not_allowed(method, "POST")
            return lambda: self._infer(request, name, version)
        handlers: dict[str | None, Callable[[], Awaitable[web.StreamResponse]]] = {
            "": lambda: self._metadata(name, version),
            "ready": lambda: self._model_ready(name, version),
            "config": lambda: self._config(name, version),
            "stats": lambda: self._stats(name, version),
        }
        if tail not in handlers:
            raise NotFound(f"no route for {method} {request.path[:200]!r}; the API is KServe v2 under /v2")
        return self._get(method, handlers[tail])

    def _get(
        self, method: str, handler: Callable[[], Awaitable[web.StreamResponse]]
    ) -> Callable[[], Awaitable[web.StreamResponse]]:
        return handler if method in ("GET", "HEAD") else self._not_allowed(method, "GET")

    @staticmethod
    def _not_allowed(method: str, allowed: str) -> Callable[[], Awaitable[web.StreamResponse]]:
        async def refuse() -> web.StreamResponse:
            message = f"method {method[:16]!r} not allowed here; use {allowed}"
            return _json(405, {"error": message}, {"Allow": allowed})

        return refuse

    def _authenticate(self, request: web.BaseRequest) -> None:
        if self._expected is None:
            return
        sent = request.headers.get("Authorization")
        if sent is None:
            raise Unauthenticated("Authorization header missing; " + _HOW_TO_AUTH)
        if not hmac.compare_digest(sent.encode(errors="replace"), self._expected.encode()):
            raise Unauthenticated("Authorization header wrong; " + _HOW_TO_AUTH)

    # The routes.

    def _health(self, path: str) -> web.Response:
        if path.rstrip("/").endswith("live"):
            return _json(200, {"live": True})
        ready = self.dataplane.ready
        return _json(200 if ready else 503, {"ready": ready})

    async def _server_metadata(self) -> web.StreamResponse:
        return _json(200, {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})

    async def _metadata(self, name: str, version: str) -> web.StreamResponse:
        kserve_codec.check_model(name, version, self.name)
        metadata = kserve_codec.model_metadata(self.name, self.dataplane.description.d_model)
        return _json(200, codec.proto_json(metadata))

    async def _model_ready(self, name: str, version: str) -> web.StreamResponse:
        kserve_codec.check_model(name, version, self.name)
        ready = self.dataplane.ready
        return _json(200 if ready else 503, {"name": self.name, "ready": ready})

    async def _config(self, name: str, version: str) -> web.StreamResponse:
        kserve_codec.check_model(name, version, self.name)
        config = kserve_codec.model_config(self.name, self.dataplane.description).config
        return _json(200, codec.proto_json(config))  # Triton answers the ModelConfig itself, not wrapped

    async def _stats(self, name: str, version: str) -> web.StreamResponse:
        if name:  # /v2/models/stats asks for every model
            kserve_codec.check_model(name, version, self.name)
        return _json(200, codec.proto_json(kserve_codec.model_statistics(self.name, self.dataplane.stats)))

    async def _infer(self, request: web.BaseRequest, name: str, version: str) -> web.StreamResponse:
        arrived = time.monotonic()
        with self.observer.observe(API, "infer", request.headers, protocol="http") as seen:
            body = await self._body(request)
            decode = _offloaded(len(body))
            infer = await decode(
                codec.infer_request_from_http,
                body,
                request.headers.get(codec.HEADER_LENGTH),
                self.name,
                name,
                version,
                self._max_json,
            )
            description = self.dataplane.description
            codec.check_json_answer(infer, description.num_heads, description.limits.max_message_bytes)
            call = infer.call
            seen.request = call.request
            if infer.timeout_s is not None:
                call.request.deadline = arrived + infer.timeout_s
            seen.result = await self._attend(infer)
            header, binaries = await _offloaded(call.request.hidden_states.nbytes)(
                codec.infer_response_to_http, infer, seen.result, self.name
            )
        return await _answer(request, header, binaries)

    async def _attend(self, infer: codec.HttpInfer) -> Any:
        request = infer.call.request
        if request.deadline is None:
            return await self.dataplane.attend(request)
        try:  # like a gRPC deadline: the call ends when it passes, wherever the request is
            async with asyncio.timeout(max(0.0, request.deadline - time.monotonic())):
                return await self.dataplane.attend(request)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request's timeout ({infer.timeout_s * 1e6:.0f} µs) passed before its answer was ready"  # type: ignore[operator]
            ) from None

    async def _body(self, request: web.BaseRequest) -> bytes:
        """The whole body, within max_body_bytes (decompressed) and body_timeout_s of the headers."""
        limit = self.policy.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise TooLarge(f"request body of {request.content_length} bytes; at most {limit} (max_message_bytes)")
        try:
            return await self._bodies.read(_read_body(request, limit))
        except BodyLate:
            raise BodyTimeout(
                f"request body not received within {self.policy.body_timeout_s:g} s of its headers "
                "(body_timeout_s); send it whole, at once"
            ) from None


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over {limit} bytes (max_message_bytes)")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _offloaded(size: int) -> Callable[..., Awaitable[Any]]:
    """Run a codec step inline when small, on a thread when big: JSON of megabytes would stall the loop."""
    if size > OFFLOAD_BYTES:
        return asyncio.to_thread

    async def inline(function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    return inline


async def _answer(request: web.BaseRequest, header: bytes, binaries: list) -> web.StreamResponse:
    if not binaries:
        return web.Response(body=header, content_type=JSON_TYPE)
    response = web.StreamResponse(headers={codec.HEADER_LENGTH: str(len(header))})
    response.content_type = "application/octet-stream"
    response.content_length = len(header) + sum(array.nbytes for array in binaries)
    await response.prepare(request)
    await response.write(header)
    for array in binaries:
        await response.write(memoryview(array).cast("B"))  # the output's own bytes, not a copy
    await response.write_eof()
    return response


class _Server(web.Server):
    """aiohttp's server with a bound on open connections: one past it is answered 503 and closed."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], max_connections: int,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.open = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open += 1
        if self.open > self.max_connections:
            body = json.dumps({"error": f"too many connections open (max {self.max_connections}); retry later"})
            transport.write(
                f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON_TYPE}\r\nContent-Length: {len(body)}\r\n"
                f"Retry-After: 1\r\nConnection: close\r\n\r\n{body}".encode()
            )
            transport.close()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)


class HttpListener:
    """The REST port: listens on the running event loop; `stop` lets requests in flight finish."""

    def __init__(self, edge: HttpEdge) -> None:
        policy = edge.policy
        self.server = _Server(
            edge.handle,
            policy.max_connections,
            keepalive_timeout=policy.body_timeout_s,  # also bounds a request's headers: idle or slow, closed
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            access_log=None,  # the Observer writes ours
        )
        self.timeout_s = policy.body_timeout_s
        self._listening: asyncio.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen; the port bound (0 picks a free one). OSError when it cannot."""
        loop = asyncio.get_running_loop()
        handshake = self.timeout_s if tls is not None else None
        self._listening = await loop.create_server(self.server, host, port, ssl=tls, ssl_handshake_timeout=handshake)
        return int(self._listening.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting connections; open ones close after their request in flight (drain)."""
        if self._listening is not None:
            self._listening.close()
        self.server.pre_shutdown()

    async def stop(self, grace_s: float) -> None:
        self.close()
        await self.server.shutdown(grace_s)
