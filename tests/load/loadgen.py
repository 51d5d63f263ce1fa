"""A grpc.aio load client for both APIs: closed loop at a fixed concurrency, pre-encoded requests.

Client CPU is kept small so that on a small machine the server gets the cores: every request message is
serialized once, before the run, and sent as raw bytes through a generic unary call; answers come back
as raw bytes and only the first of each run is parsed (to check that the server really answered). Each
request's latency is taken around the awaited call.

    from tests.load.loadgen import LoadConfig, Shape, kserve_target, run_load
    result = run_load("127.0.0.1:8001", kserve_target(Shape(1, 128, 512)), LoadConfig(concurrency=8))
    print(result.summary())

    python -m tests.load.loadgen 127.0.0.1:8001 --api v1 --shape 1,128,512 -c 8 --duration 10 --json

Building blocks, for what comes next (mixed lengths, open loop): a Target cycles through any number of
pre-encoded requests (each with its own token count), and `_Recorder` + `_call` are what a second
issuing strategy (open loop at a request rate) would share with `closed_loop`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc
import numpy as np

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.inference import grpc_service_pb2 as kserve_pb
from service.api.v1_codec import tensor_to_pb

KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
V1_ATTEND = "/attnserve.v1.AttentionService/Attend"
CLIENT_OVERLOADED = "CLIENT_OVERLOADED"  # open loop: too many calls in flight, not sent
BAD_RESPONSE = "BAD_RESPONSE"  # the error "code" of an answer that does not check out
# No message-size limit on the client: the server's own limit is what a run should meet.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    d_model: int = 512

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def nbytes(self) -> int:
        return self.tokens * self.d_model * 4  # FP32

    def __str__(self) -> str:
        return f"({self.batch},{self.seq},{self.d_model})"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """From "1,128,512" or "(1,128,512)"."""
        batch, seq, d_model = (int(part) for part in text.strip("() ").split(","))
        return cls(batch, seq, d_model)


@dataclass(frozen=True)
class Request:
    payload: bytes  # the serialized request message
    tokens: int  # tokens it asks the model to process (for tokens/s)


@dataclass(frozen=True)
class Target:
    """What to send: one gRPC method and the requests to cycle through, each already serialized."""

    name: str
    method: str  # full method path, e.g. KSERVE_INFER
    requests: tuple[Request, ...]
    check: Callable[[bytes], None] | None = None  # raises ValueError if an answer is wrong; None: don't check

    def without_check(self) -> Target:
        """The same requests, answers unchecked (for the echo server, which returns the request bytes)."""
        return replace(self, check=None)


def hidden_states(shape: Shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((shape.batch, shape.seq, shape.d_model), dtype=np.float32)


def kserve_request(x: np.ndarray, model_name: str = "attention", request_id: str = "") -> kserve_pb.ModelInferRequest:
    """ModelInfer with hidden_states FP32 in raw_input_contents (no mask, default outputs)."""
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(name="hidden_states", datatype="FP32", shape=x.shape)
    return kserve_pb.ModelInferRequest(
        model_name=model_name, id=request_id, inputs=[tensor], raw_input_contents=[x.tobytes()]
    )


def kserve_target(shape: Shape, model_name: str = "attention", seed: int = 0) -> Target:
    """KServe v2 ModelInfer, hidden_states FP32 in raw_input_contents, output `output`."""
    x = hidden_states(shape, seed)
    message = kserve_request(x, model_name)

    def check(answer: bytes) -> None:
        response = kserve_pb.ModelInferResponse.FromString(answer)
        if not response.outputs or tuple(response.outputs[0].shape) != x.shape:
            raise ValueError(f"ModelInfer answered outputs {list(response.outputs)}; expected output {x.shape}")
        if len(response.raw_output_contents) != 1 or len(response.raw_output_contents[0]) != x.nbytes:
            raise ValueError(f"ModelInfer answered raw_output_contents of the wrong size; expected {x.nbytes} B")

    return Target(f"kserve {shape}", KSERVE_INFER, (Request(message.SerializeToString(), shape.tokens),), check)


def v1_target(shape: Shape, seed: int = 0) -> Target:
    """attnserve.v1 Attend, hidden_states FP32, every sequence full length, no weights."""
    x = hidden_states(shape, seed)
    message = v1_pb.AttendRequest(hidden_states=tensor_to_pb(x))

    def check(answer: bytes) -> None:
        response = v1_pb.AttendResponse.FromString(answer)
        if tuple(response.output.shape) != x.shape or len(response.output.data) != x.nbytes:
            raise ValueError(f"Attend answered output shape {list(response.output.shape)}; expected {x.shape}")

    return Target(f"v1 {shape}", V1_ATTEND, (Request(message.SerializeToString(), shape.tokens),), check)


TARGETS: dict[str, Callable[[Shape], Target]] = {"kserve": kserve_target, "v1": v1_target}


@dataclass(frozen=True)
class LoadConfig:
    """A closed-loop run: `concurrency` callers, each sending its next request when its last is answered.

    Warm-up first (until warmup_requests are answered or warmup_s has passed), then the measured phase,
    which stops issuing once max_requests have been sent or duration_s has passed, whichever comes first,
    and ends when the calls in flight are answered. Requests run over `channels` channels, round robin;
    each channel is its own HTTP/2 connection.
    """

    concurrency: int = 1
    channels: int = 1
    warmup_requests: int | None = None  # None: 2 × concurrency; 0: no warm-up
    warmup_s: float = 5.0
    max_requests: int = 1000
    duration_s: float = 10.0
    timeout_s: float = 120.0  # per-request deadline


@dataclass
class LoadResult:
    target: str
    concurrency: int
    channels: int
    count: int  # answered without error
    errors: dict[str, int]  # status code name -> count
    elapsed_s: float  # first request sent -> last answer in
    throughput_rps: float
    tokens_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    tokens: int = 0  # answered tokens

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self, latencies: bool = False) -> dict:
        """JSON-ready; the per-request latencies only when asked."""
        out = {k: v for k, v in self.__dict__.items() if k != "latencies_ms"}
        if latencies:
            out["latencies_ms"] = list(self.latencies_ms)
        return out

    def summary(self) -> str:
        errors = f"  errors {self.errors}" if self.errors else ""
        return (
            f"{self.target:<28} c={self.concurrency:<2} n={self.count:<5} {self.throughput_rps:9.1f} req/s "
            f"{self.tokens_per_s:11.0f} tok/s  p50 {self.p50_ms:8.2f}  p90 {self.p90_ms:8.2f}  "
            f"p99 {self.p99_ms:8.2f}  max {self.max_ms:8.2f} ms{errors}"
        )

    @classmethod
    def merge(cls, results: Sequence[LoadResult]) -> LoadResult:
        """One result over several runs of the same target (e.g. rounds interleaved with other servers)."""
        first = results[0]
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r.errors)
        latencies = [ms for r in results for ms in r.latencies_ms]
        elapsed = sum(r.elapsed_s for r in results)
        tokens = sum(r.tokens for r in results)
        return summarize(first.target, first.concurrency, first.channels, latencies, dict(errors), elapsed, tokens)


def summarize(
    target: str, concurrency: int, channels: int, latencies_ms: Sequence[float], errors: dict[str, int],
    elapsed_s: float, tokens: int,
) -> LoadResult:  # fmt: skip
    """A LoadResult from raw latencies (ms) of the answered requests."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(lat, (50, 90, 99)) if lat.size else (float("nan"),) * 3
    rate = len(lat) / elapsed_s if elapsed_s > 0 else 0.0
    return LoadResult(
        target=target,
        concurrency=concurrency,
        channels=channels,
        count=int(lat.size),
        errors=errors,
        elapsed_s=elapsed_s,
        throughput_rps=rate,
        tokens_per_s=tokens / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        max_ms=float(lat.max()) if lat.size else float("nan"),
        mean_ms=float(lat.mean()) if lat.size else float("nan"),
        latencies_ms=lat.tolist(),
        tokens=tokens,
    )


class _Recorder:
    """Latencies and errors of the answered calls, and the span from the first send to the last answer."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.tokens = 0
        self.first_sent = float("inf")
        self.last_answered = float("-inf")

    def record(self, sent: float, answered: float, tokens: int, error: str | None) -> None:
        self.first_sent = min(self.first_sent, sent)
        self.last_answered = max(self.last_answered, answered)
        if error is None:
            self.latencies_ms.append((answered - sent) * 1e3)
            self.tokens += tokens
        else:
            self.errors[error] += 1

    def result(self, target: str, concurrency: int, channels: int) -> LoadResult:
        elapsed = max(self.last_answered - self.first_sent, 0.0)
        return summarize(target, concurrency, channels, self.latencies_ms, dict(self.errors), elapsed, self.tokens)


async def _call(
    stub: grpc.aio.UnaryUnaryMultiCallable, request: Request, timeout_s: float, check: Callable[[bytes], None] | None
) -> tuple[float, float, str | None]:
    """(sent, answered, error code name or None): one call, its answer checked when `check` is given."""
    sent = time.perf_counter()
    try:
        answer = await stub(request.payload, timeout=timeout_s)
        error = None
    except grpc.aio.AioRpcError as e:
        answer, error = b"", e.code().name
    answered = time.perf_counter()
    if error is None and check is not None:
        try:
            check(answer)
        except Exception:  # any failure to parse or match is the server's fault here
            error = BAD_RESPONSE
    return sent, answered, error


async def closed_loop(
    stubs: Sequence[grpc.aio.UnaryUnaryMultiCallable], target: Target, config: LoadConfig, max_requests: int,
    duration_s: float, check_first: bool,
) -> _Recorder:  # fmt: skip
    """`config.concurrency` callers over the stubs, until max_requests were sent or duration_s passed."""
    recorder = _Recorder()
    issued = itertools.count()
    requests = itertools.cycle(target.requests)
    stop_at = time.perf_counter() + duration_s
    checked = not check_first

    async def caller(index: int) -> None:
        nonlocal checked
        stub = stubs[index % len(stubs)]
        while next(issued) < max_requests and time.perf_counter() < stop_at:
            request = next(requests)
            check = None if checked else target.check
            sent, answered, error = await _call(stub, request, config.timeout_s, check)
            checked = checked or error is None  # until one answer has been checked
            recorder.record(sent, answered, request.tokens, error)

    await asyncio.gather(*(caller(i) for i in range(config.concurrency)))
    return recorder


async def open_loop(
    stubs: Sequence[grpc.aio.UnaryUnaryMultiCallable], target: Target, rate_rps: float, poisson: bool,
    max_requests: int, duration_s: float, timeout_s: float, max_in_flight: int = 1024, seed: int = 0,
) -> _Recorder:  # fmt: skip
    """Requests at a fixed rate (constant gaps, or Poisson arrivals), whatever the answers' pace.

    Bounded in count, time and in-flight calls: a send that would exceed max_in_flight is recorded as the
    error CLIENT_OVERLOADED instead of piling up. Returns once every call sent has been answered."""
    recorder = _Recorder()
    requests = itertools.cycle(target.requests)
    gaps = np.random.default_rng(seed)
    in_flight: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    due = started

    async def one(stub: grpc.aio.UnaryUnaryMultiCallable, request: Request) -> None:
        sent, answered, error = await _call(stub, request, timeout_s, None)
        recorder.record(sent, answered, request.tokens, error)

    for n in range(max_requests):
        due += gaps.exponential(1.0 / rate_rps) if poisson else 1.0 / rate_rps
        if due - started > duration_s:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        request = next(requests)
        if len(in_flight) >= max_in_flight:
            now = time.perf_counter()
            recorder.record(now, now, request.tokens, CLIENT_OVERLOADED)
            continue
        task = asyncio.create_task(one(stubs[n % len(stubs)], request))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    return recorder


def open_channels(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels, each its own connection (a local subchannel pool: channels with equal
    arguments would otherwise share one connection from gRPC's global pool)."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]


async def run_load_async(address: str, target: Target, config: LoadConfig) -> LoadResult:
    channels = open_channels(address, config.channels)
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        stubs = [channel.unary_unary(target.method) for channel in channels]  # bytes in, bytes out
        warmup = 2 * config.concurrency if config.warmup_requests is None else config.warmup_requests
        warm = await closed_loop(stubs, target, config, warmup, config.warmup_s, check_first=True)
        # Without a warm-up, the first measured answer is the one checked.
        measured = await closed_loop(stubs, target, config, config.max_requests, config.duration_s, warmup == 0)
        result = measured.result(target.name, config.concurrency, config.channels)
        # A wrong answer in the warm-up is reported, not dropped: it is the only one checked.
        for code, n in warm.errors.items():
            if code == BAD_RESPONSE:
                result.errors[code] = result.errors.get(code, 0) + n
        return result
    finally:
        for channel in channels:
            await channel.close()


def run_load(address: str, target: Target, config: LoadConfig) -> LoadResult:
    """run_load_async in a fresh event loop: for callers that are not async themselves."""
    return asyncio.run(run_load_async(address, target, config))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.load.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("address", help="host:port of the server")
    p.add_argument("--api", choices=sorted(TARGETS), default="kserve")
    p.add_argument("--shape", type=Shape.parse, default=Shape(1, 128, 512), help="batch,seq,d_model")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--requests", type=int, default=1000, help="most requests measured")
    p.add_argument("--duration", type=float, default=10.0, help="most seconds measured")
    p.add_argument("--warmup-requests", type=int, default=None, help="default 2 × concurrency; 0: none")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--no-check", action="store_true", help="don't parse the first answer (echo servers)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    target = TARGETS[args.api](args.shape)
    if args.no_check:
        target = target.without_check()
    config = LoadConfig(
        concurrency=args.concurrency,
        channels=args.channels,
        warmup_requests=args.warmup_requests,
        warmup_s=args.warmup_s,
        max_requests=args.requests,
        duration_s=args.duration,
    )
    result = run_load(args.address, target, config)
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0 if result.error_count == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
