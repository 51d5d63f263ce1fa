"""A grpc.aio load generator for both APIs: closed loop, open loop, streams; mixed sequence lengths.

    python -m tests.load.loadgen 127.0.0.1:8001 --api v1 --lengths 8-512 -c 16 --duration 10
    python -m tests.load.loadgen 127.0.0.1:8001 --lengths 16:3,512:1 --rate 50 --poisson --json
    python -m tests.load.loadgen 127.0.0.1:8001 --stream --verify models/attention --check-every 10

Closed loop: `concurrency` callers, each sending its next request when its last is answered (over unary
calls, or one bidi stream per caller with --stream). Open loop (--rate): requests at a constant rate or
with Poisson arrivals, whatever the answers' pace. Every loop is bounded in count (--requests), time
(--duration) and, open loop, calls in flight; each call carries a deadline (--deadline-ms).

Requests are encoded once, up front (tests/load/workload.py); answers come back as raw bytes and only the
sampled ones are parsed and checked: the first by default, every Nth with --check-every, against in-process
onnxruntime with --verify. The result has throughput (requests/s, tokens/s), p50/p90/p99/max latency overall
and per sequence-length bucket (the service's buckets), and errors by status code: a table for people, JSON
for machines (--json), and a progress line on stderr while it runs (--progress, default on a terminal).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
import numpy as np

from bench.harness.cpu import process_cpu_s
from service.core.seq_buckets import DEFAULT_SEQ_BUCKETS, OVERFLOW, bucket_labels, parse_bounds, seq_bucket
from tests.load.workload import APIS, LengthMix, Request, Target, build_target, model_dir_reference

CLIENT_OVERLOADED = "CLIENT_OVERLOADED"  # open loop: too many calls in flight, not sent
BAD_RESPONSE = "BAD_RESPONSE"  # the error "code" of an answer that does not check out
STREAM_ENDED = "STREAM_ENDED"  # a stream closed without answering the request it carried
# No message-size limit on the client: the server's own limit is what a run should meet.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class LoadConfig:
    """One run. Warm-up first (closed loop, until warmup_requests are answered or warmup_s has passed),
    then the measured phase, which stops issuing once max_requests have been sent or duration_s has
    passed, whichever comes first, and ends when the calls in flight are answered. Calls go over
    `channels` channels, round robin; each channel is its own HTTP/2 connection."""

    concurrency: int = 1  # closed loop: callers; open loop: the warm-up's callers
    channels: int = 1
    warmup_requests: int | None = None  # None: 2 × concurrency; 0: no warm-up
    warmup_s: float = 5.0
    max_requests: int = 1000
    duration_s: float = 10.0
    timeout_s: float = 120.0  # each call's deadline (a stream's: duration_s + timeout_s)
    rate_rps: float | None = None  # open loop at this rate; None: closed loop
    poisson: bool = False  # open loop: exponential gaps instead of constant ones
    max_in_flight: int = 1024  # open loop: a send beyond this is recorded as CLIENT_OVERLOADED
    stream: bool = False  # closed loop over one bidi stream per caller
    check_every: int = 0  # check every Nth answer; 0: only the first
    progress: bool = False  # a progress line on stderr, once a second
    seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS
    seed: int = 0  # Poisson arrivals
    server_pid: int | None = None  # measure this process's CPU over the measured phase (/proc)

    @property
    def mode(self) -> str:
        if self.rate_rps is not None:
            return f"rate={self.rate_rps:g}/s{' poisson' if self.poisson else ''}"
        return f"c={self.concurrency}{' stream' if self.stream else ''}"


@dataclass(frozen=True)
class Percentiles:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, latencies_ms: Sequence[float]) -> Percentiles:
        lat = np.asarray(latencies_ms, dtype=np.float64)
        if not lat.size:
            return cls(0, *(float("nan"),) * 5)
        p50, p90, p99 = np.percentile(lat, (50, 90, 99))
        return cls(int(lat.size), float(p50), float(p90), float(p99), float(lat.max()), float(lat.mean()))


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
    sent: int = 0  # calls started; every one ends as `count` or in `errors`
    checked: int = 0  # answers parsed and checked
    mode: str = ""
    by_bucket: dict[str, Percentiles] = field(default_factory=dict)  # seq bucket -> its answered calls
    seqs: list[int] = field(default_factory=list, repr=False)  # sequence length of each latency
    server_cpu_s: float = 0.0  # CPU the server process used over the measured phase (LoadConfig.server_pid)

    @property
    def server_cpu_us_per_request(self) -> float:
        """Server CPU (all its threads) per answered request, in µs; nan when not measured."""
        return self.server_cpu_s / self.count * 1e6 if self.count and self.server_cpu_s else float("nan")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self, latencies: bool = False) -> dict:
        """JSON-ready; the per-request latencies only when asked."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("latencies_ms", "seqs", "by_bucket")}
        out["by_bucket"] = {bucket: stats.__dict__ for bucket, stats in self.by_bucket.items()}
        if latencies:
            out["latencies_ms"], out["seqs"] = list(self.latencies_ms), list(self.seqs)
        return out

    def summary(self) -> str:
        errors = f"  errors {self.errors}" if self.errors else ""
        return (
            f"{self.target:<28} c={self.concurrency:<2} n={self.count:<5} {self.throughput_rps:9.1f} req/s "
            f"{self.tokens_per_s:11.0f} tok/s  p50 {self.p50_ms:8.2f}  p90 {self.p90_ms:8.2f}  "
            f"p99 {self.p99_ms:8.2f}  max {self.max_ms:8.2f} ms{errors}"
        )

    def table(self) -> str:
        """For people: the run, its throughput, latency overall and per bucket, errors by code."""
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        lines = [
            f"{self.target}  {self.mode}  {self.elapsed_s:.1f} s",
            f"  sent {self.sent}  answered OK {self.count}  errors {self.error_count} ({errors})  "
            f"answers checked {self.checked} (warm-up included)",
            f"  throughput {self.throughput_rps:.1f} req/s  {self.tokens_per_s:,.0f} tokens/s",
            "",
            f"  {'seq bucket':<10} {'n':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}",
        ]
        buckets = ((f"≤{b}" if b != OVERFLOW else "longer", s) for b, s in self.by_bucket.items())
        for label, s in [("all", Percentiles.of(self.latencies_ms)), *buckets]:
            lines.append(
                f"  {label:<10} {s.count:>7} {s.p50_ms:>9.2f} {s.p90_ms:>9.2f} {s.p99_ms:>9.2f} {s.max_ms:>9.2f}"
            )
        return "\n".join(lines)

    @classmethod
    def merge(cls, results: Sequence[LoadResult]) -> LoadResult:
        """One result over several runs of the same target (e.g. rounds interleaved with other servers)."""
        first = results[0]
        recorder = _Recorder()
        for r in results:
            recorder.latencies_ms += r.latencies_ms
            recorder.seqs += r.seqs
            recorder.errors.update(r.errors)
            recorder.tokens += r.tokens
            recorder.sent += r.sent
            recorder.checked += r.checked
        elapsed = sum(r.elapsed_s for r in results)
        merged = recorder.result(first.target, first.concurrency, first.channels, first.mode, elapsed)
        merged.server_cpu_s = sum(r.server_cpu_s for r in results)
        return merged


class _Recorder:
    """What a run's calls came to: latencies and lengths of the answered ones, errors by code, the span
    from the first send to the last answer."""

    def __init__(self, seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS) -> None:
        self.seq_buckets = seq_buckets
        self.latencies_ms: list[float] = []
        self.seqs: list[int] = []
        self.errors: Counter[str] = Counter()
        self.tokens = 0
        self.sent = 0
        self.checked = 0
        self.first_sent = float("inf")
        self.last_answered = float("-inf")

    @property
    def answered(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def record(self, sent: float, answered: float, request: Request, error: str | None) -> None:
        self.first_sent = min(self.first_sent, sent)
        self.last_answered = max(self.last_answered, answered)
        if error is None:
            self.latencies_ms.append((answered - sent) * 1e3)
            self.seqs.append(request.seq)
            self.tokens += request.tokens
        else:
            self.errors[error] += 1

    def check_due(self, every: int) -> bool:
        """Whether the answer just in (OK) should be checked: the first, then every `every`th."""
        ok = len(self.latencies_ms) + 1
        return self.checked == 0 if every <= 0 else (ok - 1) % every == 0

    def result(self, target: str, concurrency: int, channels: int, mode: str, elapsed_s: float | None = None
               ) -> LoadResult:  # fmt: skip
        elapsed = max(self.last_answered - self.first_sent, 0.0) if elapsed_s is None else elapsed_s
        overall = Percentiles.of(self.latencies_ms)
        grouped: dict[str, list[float]] = {label: [] for label in bucket_labels(self.seq_buckets)}
        for ms, seq in zip(self.latencies_ms, self.seqs, strict=True):
            grouped[seq_bucket(seq, self.seq_buckets)].append(ms)
        return LoadResult(
            target=target,
            concurrency=concurrency,
            channels=channels,
            count=overall.count,
            errors=dict(self.errors),
            elapsed_s=elapsed,
            throughput_rps=overall.count / elapsed if elapsed > 0 else 0.0,
            tokens_per_s=self.tokens / elapsed if elapsed > 0 else 0.0,
            p50_ms=overall.p50_ms,
            p90_ms=overall.p90_ms,
            p99_ms=overall.p99_ms,
            max_ms=overall.max_ms,
            mean_ms=overall.mean_ms,
            latencies_ms=list(self.latencies_ms),
            tokens=self.tokens,
            sent=self.sent,
            checked=self.checked,
            mode=mode,
            by_bucket={b: Percentiles.of(lat) for b, lat in grouped.items() if lat},
            seqs=list(self.seqs),
        )


def summarize(target: str, latencies_ms: Sequence[float], elapsed_s: float, tokens: int, seq: int) -> LoadResult:
    """A LoadResult of calls timed elsewhere (e.g. session.run in process), all of one sequence length."""
    recorder = _Recorder()
    recorder.latencies_ms, recorder.seqs = list(latencies_ms), [seq] * len(latencies_ms)
    recorder.tokens, recorder.sent = tokens, len(latencies_ms)
    return recorder.result(target, 1, 0, "in process", elapsed_s)


class _Run:
    """One phase of a run: the target, its config, the recorder, and how one answer is judged."""

    def __init__(self, target: Target, config: LoadConfig, max_requests: int, duration_s: float) -> None:
        self.target, self.config = target, config
        self.recorder = _Recorder(config.seq_buckets)
        self.max_requests = max_requests
        self.stop_at = time.perf_counter() + duration_s
        self.duration_s = duration_s
        self.requests = itertools.cycle(target.requests)
        self.issued = itertools.count()

    def may_send(self) -> bool:
        """Bounded in count and time: False once max_requests were sent or the duration has passed."""
        return time.perf_counter() < self.stop_at and next(self.issued) < self.max_requests

    def judge(self, request: Request, message: object | None, answer: bytes | None) -> str | None:
        """BAD_RESPONSE when a sampled answer fails its check, else None; parses only sampled answers."""
        if request.check is None or not self.recorder.check_due(self.config.check_every):
            return None
        self.recorder.checked += 1
        try:
            request.check(self.target.api.parse(answer) if message is None else message)
        except Exception:  # any failure to parse or match is the server's fault here
            return BAD_RESPONSE
        return None

    async def call(self, stub: grpc.aio.UnaryUnaryMultiCallable, request: Request) -> None:
        """One unary call, recorded."""
        self.recorder.sent += 1
        sent = time.perf_counter()
        try:
            answer = await stub(request.payload, timeout=self.config.timeout_s)
            error = None
        except grpc.aio.AioRpcError as e:
            answer, error = b"", e.code().name
        answered = time.perf_counter()
        error = error or self.judge(request, None, answer)
        self.recorder.record(sent, answered, request, error)


async def closed_loop(run: _Run, channels: Sequence[grpc.aio.Channel]) -> None:
    """`concurrency` callers over the channels, round robin, each one call at a time."""
    stubs = [channel.unary_unary(run.target.api.unary_method) for channel in channels]

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while run.may_send():
            await run.call(stub, next(run.requests))

    await asyncio.gather(*(caller(i) for i in range(run.config.concurrency)))


async def stream_loop(run: _Run, channels: Sequence[grpc.aio.Channel]) -> None:
    """`concurrency` callers, each over its own bidi stream: write a request, read its answer, repeat.
    A stream that fails is recorded against the request it was carrying and reopened for the next."""
    api, recorder = run.target.api, run.recorder

    async def caller(index: int) -> None:
        open_stream = channels[index % len(channels)].stream_stream(api.stream_method)
        call = None
        try:
            while run.may_send():
                request = next(run.requests)
                call = call or open_stream(timeout=run.duration_s + run.config.timeout_s)
                recorder.sent += 1
                sent = time.perf_counter()
                try:
                    await call.write(request.payload)
                    answer = await call.read()
                    if answer is grpc.aio.EOF:  # closed by the server with OK status, this request unanswered
                        message, error, call = None, STREAM_ENDED, None
                    else:
                        message, error = api.unwrap_stream(answer)
                except grpc.aio.AioRpcError as e:
                    message, error, call = None, e.code().name, None
                answered = time.perf_counter()
                error = error or run.judge(request, message, None)
                recorder.record(sent, answered, request, error)
        finally:
            if call is not None:
                await call.done_writing()
                call.cancel()

    await asyncio.gather(*(caller(i) for i in range(run.config.concurrency)))


async def open_loop(run: _Run, channels: Sequence[grpc.aio.Channel]) -> None:
    """Requests at config.rate_rps (constant gaps, or Poisson arrivals), whatever the answers' pace.

    Bounded in count, time and in-flight calls: a send that would exceed max_in_flight is recorded as the
    error CLIENT_OVERLOADED instead of piling up. Returns once every call sent has been answered."""
    config = run.config
    assert config.rate_rps is not None and config.rate_rps > 0
    stubs = [channel.unary_unary(run.target.api.unary_method) for channel in channels]
    gaps = np.random.default_rng(config.seed)
    in_flight: set[asyncio.Task[None]] = set()
    started = due = time.perf_counter()
    for n in range(run.max_requests):
        due += gaps.exponential(1.0 / config.rate_rps) if config.poisson else 1.0 / config.rate_rps
        if due - started > run.duration_s:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        request = next(run.requests)
        if len(in_flight) >= config.max_in_flight:
            now = time.perf_counter()
            run.recorder.sent += 1
            run.recorder.record(now, now, request, CLIENT_OVERLOADED)
            continue
        task = asyncio.create_task(run.call(stubs[n % len(stubs)], request))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


async def _progress(recorder: _Recorder, out: TextIO) -> None:
    """One line on `out`, rewritten every second, until cancelled."""
    started = time.perf_counter()
    while True:
        await asyncio.sleep(1.0)
        elapsed = time.perf_counter() - started
        ok = len(recorder.latencies_ms)
        print(
            f"\r{elapsed:7.1f} s  sent {recorder.sent}  ok {ok}  errors {sum(recorder.errors.values())}  "
            f"in flight {recorder.sent - recorder.answered}  {ok / elapsed:8.1f} req/s ",
            end="", file=out, flush=True,
        )  # fmt: skip


def open_channels(address: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels, each its own connection (a local subchannel pool: channels with equal
    arguments would otherwise share one connection from gRPC's global pool)."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]


async def _phase(
    loop: Callable[[_Run, Sequence[grpc.aio.Channel]], Awaitable[None]], run: _Run,
    channels: Sequence[grpc.aio.Channel], progress: TextIO | None,
) -> _Recorder:  # fmt: skip
    reporter = asyncio.create_task(_progress(run.recorder, progress)) if progress else None
    try:
        await loop(run, channels)
    finally:
        if reporter is not None:
            reporter.cancel()
            print(file=progress)
    return run.recorder


async def run_load_async(address: str, target: Target, config: LoadConfig) -> LoadResult:
    channels = open_channels(address, config.channels)
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        warmup = 2 * config.concurrency if config.warmup_requests is None else config.warmup_requests
        warm = await closed_loop_phase(target, config, warmup, config.warmup_s, channels) if warmup else None
        measured = _Run(target, config, config.max_requests, config.duration_s)
        if warm is not None and warm.checked:
            measured.recorder.checked = warm.checked  # the first answer was checked in the warm-up
        loop = open_loop if config.rate_rps is not None else stream_loop if config.stream else closed_loop
        cpu_before = process_cpu_s(config.server_pid) if config.server_pid else 0.0
        recorder = await _phase(loop, measured, channels, sys.stderr if config.progress else None)
        result = recorder.result(target.name, config.concurrency, config.channels, config.mode)
        if config.server_pid:
            result.server_cpu_s = process_cpu_s(config.server_pid) - cpu_before
        if warm is not None:  # a wrong answer in the warm-up is reported, not dropped
            for code, n in warm.errors.items():
                if code == BAD_RESPONSE:
                    result.errors[code] = result.errors.get(code, 0) + n
        return result
    finally:
        for channel in channels:
            await channel.close()


async def closed_loop_phase(
    target: Target, config: LoadConfig, max_requests: int, duration_s: float, channels: Sequence[grpc.aio.Channel]
) -> _Recorder:
    """The warm-up: a closed loop of unary calls at config.concurrency."""
    run = _Run(target, config, max_requests, duration_s)
    await closed_loop(run, channels)
    return run.recorder


def run_load(address: str, target: Target, config: LoadConfig) -> LoadResult:
    """run_load_async in a fresh event loop: for callers that are not async themselves."""
    return asyncio.run(run_load_async(address, target, config))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.load.loadgen", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("address", help="host:port of the server")
    p.add_argument("--api", choices=sorted(APIS), default="kserve")
    p.add_argument("--lengths", type=LengthMix.parse, default=LengthMix.fixed(128),
                   help="sequence lengths: 128, a range 8-512, or a weighted list 16:3,128:1,512")  # fmt: skip
    p.add_argument("--batch", type=int, default=1, help="sequences per request")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--pool", type=int, default=64, help="requests drawn from the mix, sent in turn")
    p.add_argument("--weights", action="store_true", help="ask for the attention weights too")
    p.add_argument("-c", "--concurrency", type=int, default=1, help="closed-loop callers")
    p.add_argument("--rate", type=float, default=None, help="open loop at this many requests/s")
    p.add_argument("--poisson", action="store_true", help="open loop with Poisson arrivals")
    p.add_argument("--max-in-flight", type=int, default=1024, help="open loop: most calls in flight")
    p.add_argument("--stream", action="store_true", help="closed loop over one bidi stream per caller")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--requests", type=int, default=1000, help="most requests measured")
    p.add_argument("--duration", type=float, default=10.0, help="most seconds measured")
    p.add_argument("--deadline-ms", type=float, default=120_000.0, help="each call's deadline")
    p.add_argument("--warmup-requests", type=int, default=None, help="default 2 × concurrency; 0: none")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--check-every", type=int, default=0, help="check every Nth answer; 0: only the first")
    p.add_argument("--verify", type=Path, metavar="MODEL_DIR", default=None,
                   help="check answers' values against in-process onnxruntime on this model directory")  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="don't parse any answer (echo servers)")
    p.add_argument("--seq-buckets", type=parse_bounds, default=DEFAULT_SEQ_BUCKETS, help="bucket upper bounds")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.stream and args.rate is not None:
        p.error("--stream runs a closed loop; it does not combine with --rate")
    reference = model_dir_reference(args.verify) if args.verify else None
    target = build_target(
        args.api, args.lengths, batch=args.batch, d_model=args.d_model, pool=args.pool, weights=args.weights,
        reference=reference,
    )  # fmt: skip
    if args.no_check:
        target = target.without_check()
    config = LoadConfig(
        concurrency=args.concurrency,
        channels=args.channels,
        warmup_requests=args.warmup_requests,
        warmup_s=args.warmup_s,
        max_requests=args.requests,
        duration_s=args.duration,
        timeout_s=args.deadline_ms / 1e3,
        rate_rps=args.rate,
        poisson=args.poisson,
        max_in_flight=args.max_in_flight,
        stream=args.stream,
        check_every=args.check_every,
        progress=args.progress,
        seq_buckets=args.seq_buckets,
    )
    result = run_load(args.address, target, config)
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0 if result.error_count == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
