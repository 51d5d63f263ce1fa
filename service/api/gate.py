"""The call gate: every call on the gRPC port passes here, before its servicer and before its message is read.

gRPC would read a unary call's whole message before any code of ours runs, and decode it with an error we
cannot turn into a status of ours. So each method is served here as a request-streaming handler that:
- checks the bearer token from the headers (a refused call's body is never read);
- takes a call slot (max_concurrent_rpcs) and, for a streaming call, a stream slot (max_concurrent_streams);
  health Check takes none, so kubelet's probes answer while the port is full;
- reads a unary call's message within body_timeout_s (headers followed by nothing cannot hold a slot);
- decodes messages itself: an undecodable unary call gets INVALID_ARGUMENT (counted like any request); in a
  stream it reaches the servicer as `Undecodable`, which answers it with an error and reads on;
- keeps the task of each unary call until gRPC has written its answer, for the drain (`unanswered`).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from weakref import WeakSet

import grpc
from google.protobuf.message import DecodeError

from service.api.body_deadlines import BodyDeadlines, BodyLate
from service.api.status import status_of
from service.core.errors import DeadlineExceeded, InvalidInput, ResourceExhausted, ServiceError, Unauthenticated
from service.observe.requests import Observer

# After two calls were in progress at once, how long before one call alone counts as lone again: under steady
# concurrency calls arrive one by one while the loop is busy, so "the only call now" would say little.
LONE_AFTER_S = 0.1
# No token and no slot: the probes of kubelet and load balancers.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})


@dataclass(frozen=True)
class GatePolicy:
    token: str | None  # None: no authentication
    max_calls: int
    max_streams: int
    body_timeout_s: float


class Undecodable:
    """A stream message that is not a valid request: the servicer answers it with an error and the stream goes on."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInput) -> None:
        self.error = error


class MethodTable:
    """Stands in for the server in the generated `add_*Servicer_to_server` functions and keeps their handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Generated code registers the same handlers through add_registered_method_handlers too."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


def _refusing(error: ServiceError) -> grpc.RpcMethodHandler:
    """Ends any call with the error's status, reading nothing of it."""
    code, message = status_of(error)

    async def refuse(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class CallGate(grpc.GenericRpcHandler):
    """One generic handler for every method in `table`; `observed` maps a method path to its (api, method)
    metric labels, for the calls counted in attnserve_requests_total."""

    def __init__(
        self, table: MethodTable, policy: GatePolicy, observer: Observer, observed: Mapping[str, tuple[str, str]]
    ) -> None:
        self.policy = policy
        self.observer = observer
        self.calls = 0  # calls holding a slot
        self.streams = 0  # streaming calls among them
        self._concurrent_until = 0.0  # time.monotonic() until which calls count as concurrent (see lone)
        # gRPC's task for each slotted unary call: it ends once the answer and status are written to the socket,
        # after our handler returned (a done task leaves the set when it is freed).
        self._unary_tasks: WeakSet[asyncio.Task] = WeakSet()
        self._observed = observed
        self._bodies = BodyDeadlines(policy.body_timeout_s)
        self._expected = None if policy.token is None else f"Bearer {policy.token}".encode()
        self._missing = _refusing(Unauthenticated("authorization metadata missing; " + _HOW_TO_AUTH))
        self._wrong = _refusing(Unauthenticated("authorization metadata wrong; " + _HOW_TO_AUTH))
        self._handlers = {path: self._wrap(path, handler) for path, handler in table.handlers.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None or self._expected is None or path in OPEN_METHODS:
            return handler
        sent = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if sent is None:
            return self._missing
        return handler if hmac.compare_digest(_as_bytes(sent), self._expected) else self._wrong

    # Slots.

    def _enter(self, streaming: bool) -> ResourceExhausted | None:
        if self.calls >= self.policy.max_calls:
            return ResourceExhausted(
                f"server busy: {self.calls} calls in progress (max_concurrent_rpcs); retry later or on another replica",
                retry_after_s=0.1,
            )
        if streaming and self.streams >= self.policy.max_streams:
            return ResourceExhausted(
                f"{self.streams} streaming calls already open (max_concurrent_streams); close one, use unary "
                "calls, or retry later",
                retry_after_s=1.0,
            )
        self.calls += 1
        self.streams += streaming
        if self.calls > 1:
            self._concurrent_until = time.monotonic() + LONE_AFTER_S
        return None

    def lone(self) -> bool:
        """Whether this is the only call in progress and none ran beside another for LONE_AFTER_S: then the
        dataplane may hold the event loop to compute it at once (nobody else waits on the loop)."""
        return self.calls <= 1 and time.monotonic() >= self._concurrent_until

    def _leave(self, streaming: bool) -> None:
        self.calls -= 1
        self.streams -= streaming

    def unanswered(self) -> list[asyncio.Task]:
        """The unary calls whose answer gRPC has not yet written to the socket (the drain waits for them)."""
        return [task for task in self._unary_tasks if not task.done()]

    def take_slot(self) -> ResourceExhausted | None:
        """A call slot for a request of the HTTP port: both ports share max_concurrent_rpcs (and so the memory
        budget's cap on calls at once). None when taken; give it back with give_slot."""
        return self._enter(False)

    def give_slot(self) -> None:
        self._leave(False)

    # Reading and decoding.

    async def _read_one(self, context: grpc.aio.ServicerContext, decode: Callable[[bytes], Any], path: str) -> Any:
        """The call's one request message, decoded, or the call ends with the status that says why not."""
        try:
            raw = await self._bodies.read(context.read())
        except BodyLate:
            error: ServiceError = DeadlineExceeded(
                f"request message not received within {self.policy.body_timeout_s:g} s of the call's start "
                "(body_timeout_s); send it whole, at once"
            )
            return await self._refuse(context, path, error)
        if raw is grpc.aio.EOF:
            return await self._refuse(context, path, InvalidInput("the call ended before its request message"))
        try:
            return decode(raw)
        except DecodeError as e:
            return await self._refuse(context, path, _undecodable(path, e))

    async def _refuse(self, context: grpc.aio.ServicerContext, path: str, error: ServiceError) -> Any:
        if (labels := self._observed.get(path)) is not None:
            self.observer.refused(*labels, error, context.invocation_metadata)
        code, message = status_of(error)
        await context.abort(code, message)

    async def _decoded(
        self, raw_requests: AsyncIterable[bytes], decode: Callable[[bytes], Any], path: str
    ) -> AsyncIterator[Any]:
        """A stream's messages, decoded; one that fails reaches the servicer as Undecodable."""
        async for raw in raw_requests:
            try:
                yield decode(raw)
            except DecodeError as e:
                yield Undecodable(_undecodable(path, e))

    # One wrapper per kind of method.

    def _wrap(self, path: str, inner: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        slotted = path not in OPEN_METHODS
        streaming = inner.request_streaming or inner.response_streaming
        decode = inner.request_deserializer or (lambda raw: raw)
        serialize = inner.response_serializer
        gate = self

        if not inner.request_streaming and not inner.response_streaming:

            async def unary(requests: object, context: grpc.aio.ServicerContext) -> Any:
                if slotted and (busy := gate._enter(False)) is not None:
                    return await gate._refuse(context, path, busy)
                if slotted:
                    gate._unary_tasks.add(asyncio.current_task())  # type: ignore[arg-type]  # gRPC's task, never None
                try:
                    request = await gate._read_one(context, decode, path)
                    return await inner.unary_unary(request, context)
                finally:
                    if slotted:
                        gate._leave(False)

            return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serialize)

        behavior = inner.unary_stream if not inner.request_streaming else inner.stream_stream
        assert behavior is not None, f"{path}: stream-unary methods are not served here"
        single = not inner.request_streaming

        async def requests_of(raw: AsyncIterable[bytes], context: grpc.aio.ServicerContext) -> Any:
            return await gate._read_one(context, decode, path) if single else gate._decoded(raw, decode, path)

        if inspect.isasyncgenfunction(behavior):

            async def generator(raw: AsyncIterable[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if (busy := gate._enter(streaming)) is not None:
                    await gate._refuse(context, path, busy)
                    return
                try:
                    async for response in behavior(await requests_of(raw, context), context):
                        yield response
                finally:
                    gate._leave(streaming)

            return grpc.stream_stream_rpc_method_handler(generator, response_serializer=serialize)

        async def writer(raw: AsyncIterable[bytes], context: grpc.aio.ServicerContext) -> None:
            if (busy := gate._enter(streaming)) is not None:
                return await gate._refuse(context, path, busy)
            try:
                await behavior(await requests_of(raw, context), context)
            finally:
                gate._leave(streaming)

        return grpc.stream_stream_rpc_method_handler(writer, response_serializer=serialize)


_HOW_TO_AUTH = "send `authorization: Bearer <token>` with the server's token"


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _undecodable(path: str, error: DecodeError) -> InvalidInput:
    kind = path.rsplit("/", 1)[-1]
    return InvalidInput(f"{kind}: the request message could not be decoded ({error}); send a valid serialized message")
