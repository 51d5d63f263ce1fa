"""Dynamic batching in the real server: a full queue answers RESOURCE_EXHAUSTED at once and recovers; requests
whose deadline passed or whose client left never reach the engine (the server's own counters say so); a
deadline that cannot be met is refused early; under overload every request gets an answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._pb.attnserve.v1 import attention_pb2 as v1
from service.api.v1_codec import tensor_to_pb
from service.host.cpu_quota import usable_cores
from tests.load.loadgen import LoadConfig, run_load
from tests.load.workload import LengthMix, build_target
from tests.server_process import ServerProcess, start_server

D_MODEL = 512
ATTEND = "/attnserve.v1.AttentionService/Attend"
LONG = (4, 2048)  # (batch, seq): a run long enough for others to queue behind it (the test model's longest)
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _request(seq: int | tuple[int, int], seed: int = 0) -> bytes:
    batch, seq = seq if isinstance(seq, tuple) else (1, seq)
    x = np.random.default_rng(seed).standard_normal((batch, seq, D_MODEL), dtype=np.float32)
    return v1.AttendRequest(hidden_states=tensor_to_pb(x)).SerializeToString()


def _channel(server: ServerProcess) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server.address, options=UNLIMITED)


@pytest.fixture(scope="module")
def one_thread(served_model: Path) -> Iterator[ServerProcess]:
    """One engine thread, each request alone, a queue of two: easy to fill, easy to hold up. Every request
    is in the access log, with the server's own timings."""
    flags = ("--engine-workers", "1", "--max-batch-sequences", "1", "--max-queue-requests", "2", "--access-log", "all")
    process = start_server(served_model, *flags)
    yield process
    assert process.stop() == 0


async def _timed(call: grpc.aio.UnaryUnaryMultiCallable, request: bytes, timeout: float | None = None) -> tuple:
    """(code, details, trailing metadata, seconds) of one call."""
    started = time.perf_counter()
    pending = call(request, timeout=timeout)
    try:
        await pending
        code, details = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details() or ""
    trailers = dict(await pending.trailing_metadata() or ())
    return code, details, trailers, time.perf_counter() - started


def test_a_full_queue_answers_resource_exhausted_at_once_and_the_server_recovers(one_thread: ServerProcess) -> None:
    refused_before = one_thread.metric("attnserve_dropped_requests_total", reason="queue_full")

    async def burst() -> list[tuple]:
        async with _channel(one_thread) as channel:
            call = channel.unary_unary(ATTEND)
            return await asyncio.gather(*(_timed(call, _request(LONG, seed)) for seed in range(10)))

    logged = len(one_thread.access_lines)
    answers = asyncio.run(burst())
    ok = [a for a in answers if a[0] == grpc.StatusCode.OK]
    refused = [a for a in answers if a[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) + len(refused) == len(answers), [a[:2] for a in answers]
    assert len(ok) >= 3 and len(refused) >= 1  # one running, two queued; the rest cannot all have fit
    for _, details, trailers, _ in refused:
        assert "queue full" in details and "the limit is 2" in details, details
        assert int(trailers["grpc-retry-pushback-ms"]) >= 1  # when to come back
    # Refused at once: in the server, a refusal takes less time than any accepted request's compute alone.
    time.sleep(1.0)  # the access log is written twice a second
    lines = [json.loads(line) for line in list(one_thread.access_lines)[logged:]]
    refused_us = [line["total_us"] for line in lines if line["code"] == "RESOURCE_EXHAUSTED"]
    compute_us = [line["compute_us"] for line in lines if line["code"] == "OK"]
    assert len(refused_us) == len(refused) and len(compute_us) == len(ok)
    assert max(refused_us) < min(compute_us), (refused_us, compute_us)
    assert one_thread.metric("attnserve_dropped_requests_total", reason="queue_full") - refused_before == len(refused)

    async def after() -> tuple:
        async with _channel(one_thread) as channel:
            return await _timed(channel.unary_unary(ATTEND), _request(64))

    assert asyncio.run(after())[0] == grpc.StatusCode.OK  # the queue emptied; the server serves again


def _runs(server: ServerProcess) -> tuple[float, float]:
    """(engine runs, sequences computed) so far."""
    return server.metric("attnserve_batch_size_count"), server.metric("attnserve_batch_size_sum")


def test_expired_and_cancelled_requests_never_reach_the_engine(one_thread: ServerProcess) -> None:
    dropped = {r: one_thread.metric("attnserve_dropped_requests_total", reason=r) for r in ("deadline", "cancelled")}
    runs_before, sequences_before = _runs(one_thread)

    async def held_up() -> tuple[tuple, tuple, tuple]:
        async with _channel(one_thread) as channel:
            call = channel.unary_unary(ATTEND)
            long = asyncio.create_task(_timed(call, _request(LONG, 1)))
            # Waits on what the server reports, not fixed pauses: the long request is 16 MiB to send and parse,
            # and a request that got there first would take the engine thread and run.
            await asyncio.to_thread(one_thread.wait_for_metric, "attnserve_inflight_requests", 1)
            left = call(_request(16, 3))  # queued, then its client goes away
            await asyncio.to_thread(one_thread.wait_for_metric, "attnserve_queue_depth", 1)
            expiring = asyncio.create_task(_timed(call, _request(16, 2), timeout=0.1))
            left.cancel()
            return await long, await expiring, (left.cancelled(),)

    long, expiring, (cancelled,) = asyncio.run(held_up())
    assert long[0] == grpc.StatusCode.OK and long[3] > 0.1, long[:2]  # it did hold the thread past the deadline
    assert expiring[0] == grpc.StatusCode.DEADLINE_EXCEEDED and cancelled
    time.sleep(0.2)  # the scheduler drops the two when the thread frees up, right after the long answer
    assert one_thread.metric("attnserve_dropped_requests_total", reason="deadline") - dropped["deadline"] == 1
    assert one_thread.metric("attnserve_dropped_requests_total", reason="cancelled") - dropped["cancelled"] == 1
    runs, sequences = _runs(one_thread)
    assert (runs - runs_before, sequences - sequences_before) == (1, LONG[0])  # only the long request ran


def test_a_deadline_that_cannot_be_met_is_refused_before_queueing(one_thread: ServerProcess) -> None:
    async def run() -> tuple[tuple, tuple]:
        async with _channel(one_thread) as channel:
            call = channel.unary_unary(ATTEND)
            measured = await _timed(call, _request(LONG, 4))  # the server learns what this length costs
            hopeless = await _timed(call, _request(LONG, 5), timeout=measured[3] / 10)
            return measured, hopeless

    measured, hopeless = asyncio.run(run())
    assert measured[0] == grpc.StatusCode.OK
    assert hopeless[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline cannot be met" in hopeless[1] and "ms of compute" in hopeless[1], hopeless[1]


def _thread_nice(pid: int) -> dict[int, int]:
    """thread id -> nice, from /proc (field 19 of stat; the name before it may hold spaces)."""
    tasks = Path(f"/proc/{pid}/task")
    return {int(t.name): int((t / "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in tasks.iterdir()}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice is read from Linux's /proc")
def test_compute_threads_run_below_the_event_loop(one_thread: ServerProcess) -> None:
    async def one() -> tuple:
        async with _channel(one_thread) as channel:
            return await _timed(channel.unary_unary(ATTEND), _request(64, 6))

    assert asyncio.run(one())[0] == grpc.StatusCode.OK  # the engine thread exists once it has run something
    nice = _thread_nice(one_thread.process.pid)
    assert nice[one_thread.process.pid] == 0  # the main thread: the event loop
    lowered = [tid for tid, value in nice.items() if value == 10]  # --engine-nice's default
    # The engine thread, plus onnxruntime's intra-op pools (created at load) where there are 2+ cores.
    assert len(lowered) >= (2 if usable_cores() > 1 else 1), nice
    assert sorted(set(nice.values())) == [0, 10], nice  # gRPC's threads keep the loop's priority


def test_under_overload_every_request_is_answered(served_model: Path) -> None:
    """64 callers against a queue of 8: sent = answered, each OK or RESOURCE_EXHAUSTED, never left hanging."""
    process = start_server(served_model, "--max-queue-requests", "8")
    try:
        target = build_target("v1", LengthMix.parse("8-512"), d_model=D_MODEL, seed=3)
        config = LoadConfig(concurrency=64, warmup_requests=0, duration_s=3.0, max_requests=20_000, timeout_s=30.0)
        result = run_load(process.address, target, config)
    finally:
        assert process.stop() == 0
    assert result.sent == result.count + result.error_count, result.summary()
    assert set(result.errors) <= {"RESOURCE_EXHAUSTED"}, result.errors
    assert result.count > 0 and result.errors.get("RESOURCE_EXHAUSTED", 0) > 0, result.summary()
