"""Clients that hold what the server gives them: streams never read, calls that never send a body, calls
without a token, and connections to the metrics port that never finish a request."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service._pb.inference import grpc_service_pb2 as k_pb
from service._pb.inference import grpc_service_pb2_grpc as k_grpc
from service.api.v1_codec import tensor_to_pb
from tests.resilience.harness import (
    CHANNEL_OPTIONS,
    D_MODEL,
    OWN_CONNECTION,
    Metadata,
    case,
    check_after,
    identity,
    observe,
    running,
    states,
    watching,
)

pytestmark = pytest.mark.resilience

ATTEND = "/attnserve.v1.AttentionService/Attend"
WATCH = "/grpc.health.v1.Health/Watch"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.name
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.name
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.name


# ---------------------------------------------------------------------------------------------------------------
# streams_never_read


STREAM_SECONDS = 8.0
STREAM_MAX_REQUESTS = 200  # per stream: 400 MiB of requests at most, each asking 32 MiB of weights back
STREAM_RSS_BOUND_MIB = 600


def _sender(make: object, stop: threading.Event, sent: Counter[str], key: str) -> Iterator[object]:
    """Requests until told to stop; grpc pulls the next one only once the last could be sent (flow control)."""
    for _ in range(STREAM_MAX_REQUESTS):
        if stop.is_set():
            return
        sent[key] += 1
        yield make
    stop.wait()  # keep the stream open (no half-close) until the end of the case


def test_streams_never_read(served_model: Path) -> None:
    x = states((1, 1024, D_MODEL), seed=2)
    v1_request = v1_pb.AttendRequest(id="unread", hidden_states=tensor_to_pb(x), weights=v1_pb.WeightsRequest())
    k_request = k_pb.ModelInferRequest(model_name="attention", id="unread", raw_input_contents=[x.tobytes()])
    k_request.inputs.add(name="hidden_states", datatype="FP32", shape=x.shape)
    k_request.outputs.add(name="output")
    k_request.outputs.add(name="attention_weights")
    attack = (
        "AttendStream + ModelStreamInfer sending (1,1024,512) weights requests (32 MiB answers), never reading, "
        f"{STREAM_SECONDS:.0f} s; --max-stream-pending 4"
    )
    with case("streams_never_read", attack) as result, running(served_model, "--max-stream-pending", "4") as server:
        stop = threading.Event()
        sent: Counter[str] = Counter()
        with watching(server, served_model, abort_above_mib=2 * STREAM_RSS_BOUND_MIB) as watch:
            channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
            calls = [
                v1_grpc.AttentionServiceStub(channel).AttendStream(_sender(v1_request, stop, sent, "v1"), timeout=60),
                k_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                    _sender(k_request, stop, sent, "kserve"), timeout=60
                ),
            ]
            deadline = time.monotonic() + STREAM_SECONDS
            while time.monotonic() < deadline and not watch.sampler.exceeded.is_set():
                time.sleep(0.1)
            stop.set()
            for call in calls:
                if call.done():  # the server ended it: that code is what the attacker saw
                    result.codes[call.code().name] += 1
                call.cancel()
            channel.close()
        result.figures["requests sent (v1, kserve)"] = f"{sent['v1']}, {sent['kserve']}"
        result.figures["stopped early (RSS over twice the bound)"] = str(watch.sampler.exceeded.is_set())
        observe(result, watch, STREAM_RSS_BOUND_MIB)
        result.expect("codes documented", set(result.codes) <= {RESOURCE_EXHAUSTED}, str(dict(result.codes)))
        result.checks.append(check_after(server, served_model))


# ---------------------------------------------------------------------------------------------------------------
# calls_held_open


HELD_CALLS = 128
HELD_CHANNELS = 4
PER_CONNECTION = 16  # --max-streams-per-connection: what one connection can hold, whatever it asks
CALL_SLOTS = 128  # --max-concurrent-rpcs: above what the attacker's connections can hold, so the victim gets in
BODY_TIMEOUT_S = 2.0
WAVES = HELD_CALLS // (HELD_CHANNELS * PER_CONNECTION)  # the client queues the calls past each connection's cap
WATCH_STREAMS = 200
MAX_STREAMS = 16
HOLD_SECONDS = 8.0  # no call may outlive this


async def _headers_only(
    address: str, count: int, channels: int, metadata: Metadata = (), hold_s: float = HOLD_SECONDS
) -> list[tuple[str, float]]:
    """`count` unary Attend calls that send their headers and never a message; (code, seconds) of each.

    The request iterator waits on an event that is set only at the end, so no body is sent; calls still open
    after hold_s are cancelled and reported as 'held'."""
    release = asyncio.Event()

    async def never() -> AsyncIterator[bytes]:
        await release.wait()
        return
        yield b""  # an async generator that yields nothing

    opened = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(channels)]
    try:
        methods = [
            ch.stream_unary(ATTEND, request_serializer=identity, response_deserializer=identity) for ch in opened
        ]

        async def one(i: int) -> tuple[str, float]:
            started = time.monotonic()
            call = methods[i % channels](never(), timeout=hold_s + 10, metadata=metadata)
            try:
                await asyncio.wait_for(call, hold_s)
                return "OK", time.monotonic() - started
            except grpc.aio.AioRpcError as error:
                return error.code().name, time.monotonic() - started
            except TimeoutError:
                return "held", time.monotonic() - started

        outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        release.set()
        for ch in opened:
            await ch.close()
    return outcomes


async def _watch_streams(address: str, count: int, channels: int, hold_s: float) -> tuple[Counter[str], int]:
    """`count` health Watch streams over `channels` connections, held open for hold_s: the codes of those the
    server ended, and how many got their first SERVING answer."""
    serving = 0

    async def one(method: grpc.aio.UnaryStreamMultiCallable) -> str:
        nonlocal serving
        call = method(health_pb2.HealthCheckRequest(), timeout=hold_s + 10)
        try:
            async with asyncio.timeout(hold_s):
                async for answer in call:
                    serving += answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as error:
            return error.code().name
        except TimeoutError:
            return "held"
        return "ended"

    opened = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(channels)]
    try:
        methods = [
            ch.unary_stream(
                WATCH,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            for ch in opened
        ]
        codes = Counter(await asyncio.gather(*(one(methods[i % channels]) for i in range(count))))
    finally:
        for ch in opened:
            await ch.close()
    return codes, serving


def _held_figures(outcomes: list[tuple[str, float]]) -> dict[str, list[float]]:
    by_code: dict[str, list[float]] = {}
    for code, seconds in outcomes:
        by_code.setdefault(code, []).append(seconds)
    return by_code


def test_calls_held_open(served_model: Path) -> None:
    attack = (
        f"(a) {HELD_CALLS} unary Attend calls sending headers, never a body, over {HELD_CHANNELS} connections "
        f"(--max-streams-per-connection {PER_CONNECTION} --max-concurrent-rpcs {CALL_SLOTS} --body-timeout-s "
        f"{BODY_TIMEOUT_S:g}); (b) {WATCH_STREAMS} health Watch streams "
        f"held open over {HELD_CHANNELS} connections (--max-concurrent-streams {MAX_STREAMS})"
    )
    with case("calls_held_open", attack) as result:
        flags = (
            "--max-concurrent-rpcs", str(CALL_SLOTS), "--max-streams-per-connection", str(PER_CONNECTION),
            "--body-timeout-s", str(BODY_TIMEOUT_S),
        )  # fmt: skip
        hold_s = WAVES * BODY_TIMEOUT_S + 2
        with running(served_model, *flags) as server:
            with watching(server, served_model, abort_above_mib=1024) as watch:
                outcomes = asyncio.run(_headers_only(server.address, HELD_CALLS, HELD_CHANNELS, hold_s=hold_s))
            observe(result, watch, 100, part="(a)")
            result.checks.append(check_after(server, served_model))
        by_code = _held_figures(outcomes)
        result.codes.update({f"(a) {code}": len(times) for code, times in by_code.items()})
        for code, times in sorted(by_code.items()):
            result.figures[f"(a) {code} after"] = f"{min(times):.2f}..{max(times):.2f} s"
        timed_out = by_code.get(DEADLINE_EXCEEDED, [])
        # Each connection holds at most PER_CONNECTION calls; the server ends each after the body timeout, and the
        # client's queued calls take their place: WAVES rounds of BODY_TIMEOUT_S, no call held longer.
        # A connection's streams past the cap are queued by the client, or refused by the server's HTTP/2 layer
        # (REFUSED_STREAM, which the client reports as UNAVAILABLE) when they race the first SETTINGS frame.
        result.expect(
            "(a) every held call ended by the server: DEADLINE_EXCEEDED (UNAVAILABLE past the stream cap)",
            DEADLINE_EXCEEDED in by_code and set(by_code) <= {DEADLINE_EXCEEDED, UNAVAILABLE},
            str({code: len(times) for code, times in by_code.items()}),
        )
        result.expect(
            f"(a) in {WAVES} waves of ~{BODY_TIMEOUT_S:g} s",
            bool(timed_out)
            and min(timed_out) >= BODY_TIMEOUT_S * 0.75
            and max(timed_out) <= WAVES * BODY_TIMEOUT_S + 1.5,
            f"{min(timed_out or [0]):.2f}..{max(timed_out or [0]):.2f} s",
        )

        with running(served_model, "--max-concurrent-streams", str(MAX_STREAMS)) as server:
            with watching(server, served_model, abort_above_mib=1024) as watch:
                codes, serving = asyncio.run(_watch_streams(server.address, WATCH_STREAMS, HELD_CHANNELS, hold_s=3.0))
            observe(result, watch, 100, part="(b)")
            result.checks.append(check_after(server, served_model))
        result.codes.update({f"(b) {code}": n for code, n in codes.items()})
        result.figures["(b) streams answered SERVING"] = str(serving)
        result.expect(
            "(b) over the limit RESOURCE_EXHAUSTED",
            set(codes) == {RESOURCE_EXHAUSTED, "held"} and codes["held"] <= MAX_STREAMS,
            str(dict(codes)),
        )


# ---------------------------------------------------------------------------------------------------------------
# unauthenticated_body_refused


UNAUTHENTICATED_CALLS = 200
TOKEN = "secret"


def test_unauthenticated_body_refused(served_model: Path) -> None:
    attack = (
        f"{UNAUTHENTICATED_CALLS} Attend calls without a token over {HELD_CHANNELS} connections, headers only, never "
        "a body; --auth-token secret"
    )
    with case("unauthenticated_body_refused", attack) as result, running(served_model, "--auth-token", TOKEN) as server:
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        with watching(server, served_model, metadata=metadata, abort_above_mib=1024) as watch:
            outcomes = asyncio.run(_headers_only(server.address, UNAUTHENTICATED_CALLS, HELD_CHANNELS, hold_s=5.0))
        observe(result, watch, 100)
        result.checks.append(check_after(server, served_model, metadata))
        by_code = _held_figures(outcomes)
        result.codes.update({code: len(times) for code, times in by_code.items()})
        slowest = max(seconds for _, seconds in outcomes)
        result.figures["slowest answer"] = f"{slowest:.2f} s"
        result.expect("all UNAUTHENTICATED", set(by_code) == {grpc.StatusCode.UNAUTHENTICATED.name}, str(result.codes))
        result.expect("each within 1 s", slowest <= 1.0, f"{slowest:.2f} s")


# ---------------------------------------------------------------------------------------------------------------
# metrics_port_flood


FLOOD_CONNECTIONS = 800
FLOOD_SECONDS = 5.0
SCRAPES = 5
THREADS_OVER_BASELINE = 64


def _scrape(port: int) -> float:
    """Seconds for one full /metrics answer (an error raises)."""
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        answer.read()
    return time.monotonic() - started


def _flood(port: int, count: int, stop: threading.Event, connected: list[int]) -> None:
    """Open `count` connections without waiting on any (a server that accepts slowly must not slow the attack),
    send half a request line on every other one once connected, hold them all until `stop`."""
    selector = selectors.DefaultSelector()
    sockets = []
    try:
        for i in range(count):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))  # EINPROGRESS: the kernel finishes it
            sockets.append(s)
            selector.register(s, selectors.EVENT_WRITE, i)
        while not stop.is_set() and selector.get_map():
            for key, _ in selector.select(0.05):
                selector.unregister(key.fileobj)
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected[0] += 1
                    if key.data % 2:
                        s.send(b"GET /metr")  # half a request line, never finished
        stop.wait()
    finally:
        selector.close()
        for s in sockets:
            s.close()


def test_metrics_port_flood(served_model: Path) -> None:
    attack = (
        f"{FLOOD_CONNECTIONS} TCP connections to the metrics port sending nothing or half a request line, held "
        f"{FLOOD_SECONDS:.0f} s, while {SCRAPES} scrapes run"
    )
    with case("metrics_port_flood", attack) as result, running(served_model) as server:
        scrapes: list[float] = []
        scrape_errors: list[str] = []
        stop, connected = threading.Event(), [0]
        with watching(server, served_model, abort_above_mib=1024) as watch:
            flood = threading.Thread(target=_flood, args=(server.metrics_port, FLOOD_CONNECTIONS, stop, connected))
            flood.start()
            try:
                deadline = time.monotonic() + FLOOD_SECONDS
                for i in range(SCRAPES):
                    time.sleep(max(0.0, deadline - FLOOD_SECONDS * (SCRAPES - i) / SCRAPES - time.monotonic()))
                    try:
                        scrapes.append(_scrape(server.metrics_port))
                    except OSError as error:
                        scrape_errors.append(f"{type(error).__name__}: {error}"[:120])
                time.sleep(max(0.0, deadline - time.monotonic()))
            finally:
                stop.set()
                flood.join(10)
        result.codes["connected"] += connected[0]
        result.codes["not connected"] += FLOOD_CONNECTIONS - connected[0]
        observe(result, watch, 100)
        result.checks.append(check_after(server, served_model))
        threads = watch.sampler.peak_threads
        bound = watch.sampler.baseline_threads + THREADS_OVER_BASELINE
        result.figures["server threads (baseline, peak, bound)"] = (
            f"{watch.sampler.baseline_threads}, {threads}, {bound}"
        )
        result.figures["scrapes"] = ", ".join(f"{s * 1e3:.0f} ms" for s in scrapes) + (
            f"; errors {scrape_errors}" if scrape_errors else ""
        )
        result.expect(
            f"{SCRAPES} scrapes, each within 1 s",
            len(scrapes) == SCRAPES and max(scrapes) <= 1.0,
            f"{len(scrapes)} answered, slowest {max(scrapes or [np.inf]):.2f} s",
        )
        result.expect("server threads within bound", threads <= bound, f"peak {threads}, bound {bound}")
