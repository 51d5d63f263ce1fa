"""Python client of attnserve.v1: sync `AttentionClient`, async `AsyncAttentionClient` (the CLI is cli.py).

numpy in, numpy out (tensors.py packs and unpacks; the server checks). Server errors are not wrapped: every call may
raise `grpc.RpcError` (`grpc.aio.AioRpcError` from the async client), whose `code()` is a `grpc.StatusCode` and
whose `details()` says what was wrong and what is allowed.

    with AttentionClient("127.0.0.1:8001") as client:
        result = client.attend(x, lengths=[5, 7], weights=WeightsQuery(positions=(3,), top_k=5))
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np

from attnserve_client._pb.attnserve.v1 import attention_pb2 as pb
from attnserve_client._pb.attnserve.v1 import attention_pb2_grpc as pb_grpc
from attnserve_client.channel_policy import balanced_options
from attnserve_client.tensors import fill_tensor, tensor_from_pb

DEFAULT_TARGET = "127.0.0.1:8001"
# No message size limit of the client's own, either way: the server's max_message_bytes governs (it refuses a larger
# request with RESOURCE_EXHAUSTED naming both sizes, and sends nothing larger), and ModelInfo reports it. A copy of
# its number here would drift from a server configured otherwise, and gRPC's own 4 MiB receive default would refuse
# answers the server allows.
UNLIMITED = -1
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class UsageError(Exception):
    """A value the served model makes invalid, found before sending (the CLI exits 2 on it)."""


@dataclass(frozen=True)
class WeightsQuery:
    """Which attention weights to ask for: query `positions` (empty: all), per head or averaged, top-k or full rows."""

    positions: Sequence[int] = ()
    average_heads: bool = False
    top_k: int = 0


@dataclass(frozen=True)
class Timing:
    """The server's timing breakdown, in microseconds."""

    queue_us: int
    compute_us: int
    total_us: int


@dataclass(frozen=True)
class AttendResult:
    """One Attend answer. Arrays are read-only views of the response bytes (copy them to write)."""

    id: str
    output: np.ndarray  # [batch, seq, d_model], dtype of the input
    weights: np.ndarray | None  # FP32 [batch, heads or 1, positions, seq or k]; None unless asked for
    weight_indices: np.ndarray | None  # INT32 key positions, same shape as weights; top_k only
    weight_positions: tuple[int, ...]  # query positions of the weight rows
    averaged: bool  # weights averaged over heads (heads dimension 1)
    timing: Timing
    graph: str  # the model graph that computed it


@dataclass(frozen=True)
class StreamRequest:
    """One request of `attend_stream`; an empty id is replaced by the request's index in the stream."""

    hidden_states: np.ndarray
    lengths: Sequence[int] | None = None
    weights: WeightsQuery | None = None
    id: str = ""


@dataclass(frozen=True)
class StreamError:
    """The server's error for one request of a stream (the stream goes on)."""

    code: grpc.StatusCode
    message: str


StreamAnswer = tuple[str, AttendResult | StreamError]


# Request building and response decoding, shared by both clients.


def attend_request(
    hidden_states: np.ndarray,
    lengths: Sequence[int] | None = None,
    weights: WeightsQuery | None = None,
    request_id: str = "",
) -> pb.AttendRequest:
    """The AttendRequest for an FP32 or FP16 array [batch, seq, d_model]."""
    x = np.asarray(hidden_states)
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4):
        raise TypeError(f"hidden_states: dtype {x.dtype}; allowed float32 or float16")
    request = pb.AttendRequest(id=request_id)
    fill_tensor(request.hidden_states, x)
    if lengths is not None:
        request.lengths.extend(int(n) for n in lengths)
    if weights is not None:
        request.weights.positions.extend(int(p) for p in weights.positions)
        request.weights.average_heads = weights.average_heads
        request.weights.top_k = weights.top_k
        request.weights.SetInParent()  # present even when every field is at its default: all rows, per head
    return request


def attend_result(response: pb.AttendResponse) -> AttendResult:
    """Decode an AttendResponse."""
    output = tensor_from_pb(response.output)
    values = indices = None
    w = response.weights
    if response.HasField("weights"):
        values = tensor_from_pb(w.values)
        if w.HasField("indices"):
            indices = tensor_from_pb(w.indices)
    t = response.timing
    return AttendResult(
        id=response.id,
        output=output,
        weights=values,
        weight_indices=indices,
        weight_positions=tuple(w.positions),
        averaged=w.averaged,
        timing=Timing(t.queue_us, t.compute_us, t.total_us),
        graph=response.graph,
    )


def stream_request(index: int, item: StreamRequest) -> pb.AttendRequest:
    """The AttendRequest of a stream's `index`-th item."""
    return attend_request(item.hidden_states, item.lengths, item.weights, item.id or str(index))


class StreamEncoder:
    """The messages of one AttendStream call. An error while iterating or encoding the requests does not cancel
    the call (gRPC would swallow it): it ends the request stream, the requests before it are still answered, and
    `check()` re-raises it after the last answer."""

    def __init__(self, requests: Iterable[StreamRequest] | AsyncIterable[StreamRequest]) -> None:
        self.requests = requests
        self.error: Exception | None = None

    def messages(self) -> Iterator[pb.AttendRequest]:
        assert isinstance(self.requests, Iterable)
        try:
            for index, item in enumerate(self.requests):
                yield stream_request(index, item)
        except Exception as error:
            self.error = error

    async def async_messages(self) -> AsyncIterator[pb.AttendRequest]:
        if not isinstance(self.requests, AsyncIterable):
            for message in self.messages():
                yield message
            return
        index = 0
        try:
            async for item in self.requests:
                yield stream_request(index, item)
                index += 1
        except Exception as error:
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def stream_answer(response: pb.AttendStreamResponse) -> StreamAnswer:
    """Decode one AttendStreamResponse: (id, result or the server's error for that request)."""
    if response.HasField("error"):
        code = _STATUS_CODES.get(response.error.code, grpc.StatusCode.UNKNOWN)
        return response.id, StreamError(code, response.error.message)
    return response.id, attend_result(response.response)


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def channel_credentials(
    tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when a CA or a client certificate is given (no CA: the system's roots); else None."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    if tls_ca is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))


def channel_options(max_message_bytes: int, tls_server_name: str | None) -> list[tuple[str, Any]]:
    """Message limits (UNLIMITED: -1), and calls balanced over every address the target resolves to, UNAVAILABLE
    retried (channel_policy.py)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *balanced_options(),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


class _ClientBase:
    """Options shared by both clients (see the module docstring); subclasses open the channel, sync or aio."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = UNLIMITED,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self._options = channel_options(max_message_bytes, tls_server_name)
        self.channel = self._open_channel()
        self._stub = pb_grpc.AttentionServiceStub(self.channel)

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def _call(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Keyword arguments of every stub call: metadata and deadline."""
        return {"metadata": self._metadata, "timeout": self.timeout_s if timeout_s is None else timeout_s}


class AttentionClient(_ClientBase):
    """Blocking client. Every method may raise grpc.RpcError; use it as a context manager or call close()."""

    def _open_channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=self._options)
        return grpc.secure_channel(self.target, self._credentials, options=self._options)

    def info(self, *, timeout_s: float | None = None) -> pb.ModelInfo:
        """The served model, the server's limits and routes."""
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call(timeout_s))

    def attend(
        self,
        hidden_states: np.ndarray,
        lengths: Sequence[int] | None = None,
        *,
        weights: WeightsQuery | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> AttendResult:
        """Attention over [batch, seq, d_model] (FP32 or FP16); `lengths` marks the real tokens of each sequence."""
        request = attend_request(hidden_states, lengths, weights, request_id)
        return attend_result(self._stub.Attend(request, **self._call(timeout_s)))

    def attend_stream(
        self, requests: Iterable[StreamRequest], *, timeout_s: float | None = None
    ) -> Iterator[StreamAnswer]:
        """(id, AttendResult or StreamError) per request, in completion order, over one AttendStream call.

        A request that cannot be sent (say a float64 array) ends the stream: the requests before it are answered,
        then its error is raised (see StreamEncoder)."""
        encoder = StreamEncoder(requests)
        call = self._stub.AttendStream(encoder.messages(), **self._call(timeout_s))
        try:
            for response in call:
                yield stream_answer(response)
        finally:
            call.cancel()  # a no-op once finished; ends the call when the caller stops early
        encoder.check()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAttentionClient(_ClientBase):
    """grpc.aio client, same API with `await`; create it inside the running event loop."""

    def _open_channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=self._options)

    async def info(self, *, timeout_s: float | None = None) -> pb.ModelInfo:
        """The served model, the server's limits and routes."""
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call(timeout_s))

    async def attend(
        self,
        hidden_states: np.ndarray,
        lengths: Sequence[int] | None = None,
        *,
        weights: WeightsQuery | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> AttendResult:
        """Attention over [batch, seq, d_model] (FP32 or FP16); `lengths` marks the real tokens of each sequence."""
        request = attend_request(hidden_states, lengths, weights, request_id)
        return attend_result(await self._stub.Attend(request, **self._call(timeout_s)))

    async def attend_stream(
        self, requests: Iterable[StreamRequest] | AsyncIterable[StreamRequest], *, timeout_s: float | None = None
    ) -> AsyncIterator[StreamAnswer]:
        """(id, AttendResult or StreamError) per request, in completion order, over one AttendStream call.

        A request that cannot be sent (say a float64 array) ends the stream: the requests before it are answered,
        then its error is raised (see StreamEncoder)."""
        encoder = StreamEncoder(requests)
        call = self._stub.AttendStream(encoder.async_messages(), **self._call(timeout_s))
        try:
            async for response in call:
                yield stream_answer(response)
        finally:
            call.cancel()  # a no-op once finished; ends the call when the caller stops early
        encoder.check()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
