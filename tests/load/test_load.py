"""Load against the real server: mixed lengths at concurrency 16 on both APIs, streams, overload, a slow client.

Every loop is bounded in count and time. Sampled answers are checked against in-process onnxruntime on the
same inputs (the service's own Engine, CPU), so a fast wrong answer fails.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from model.reference import relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service.api.v1_codec import tensor_from_pb, tensor_to_pb
from service.engine.model_dir import load_model_directory
from service.engine.sessions import Engine
from tests.load.loadgen import BAD_RESPONSE, LoadConfig, run_load
from tests.load.workload import LengthMix, Reference, build_target, engine_reference
from tests.server_process import ServerProcess, start_server

pytestmark = pytest.mark.load

D_MODEL = 512
LENGTHS = (8, 16, 33, 64, 128, 200, 256, 384, 512)
SAMPLE_EVERY = 7  # one answer in seven is checked against in-process onnxruntime


@pytest.fixture(scope="module")
def server(served_model: Path) -> Iterator[ServerProcess]:
    """A server without the queue's estimated-wait bound: these tests check answers under load, and on a machine
    slowed by other work that bound (rightly) refuses requests; the overload tests elsewhere test it."""
    process = start_server(served_model, "--max-queue-wait-ms", "0")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def in_process(served_model: Path) -> Engine:
    return Engine(load_model_directory(served_model), "cpu")


def _inputs(seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    seq = int(rng.choice(LENGTHS))
    return rng.standard_normal((1, seq, D_MODEL), dtype=np.float32), seq


def _off_by(reference: Reference, scale: float) -> Reference:
    def wrong(x: np.ndarray, weights: bool) -> tuple[np.ndarray, np.ndarray | None]:
        output, probs = reference(x, weights)
        return output * scale, probs

    return wrong


MIX = LengthMix(LENGTHS)
MIXED_16 = LoadConfig(concurrency=16, warmup_requests=0, duration_s=4.0, max_requests=6400, check_every=SAMPLE_EVERY,
                      timeout_s=30.0)  # fmt: skip


@pytest.mark.parametrize("api", ["kserve", "v1"])
def test_mixed_lengths_at_concurrency_16(server: ServerProcess, in_process: Engine, api: str) -> None:
    result = run_load(server.address, build_target(api, MIX, reference=engine_reference(in_process)), MIXED_16)
    assert result.sent == result.count > 32 and not result.errors, result.table()  # every request answered OK
    assert result.checked >= result.count // SAMPLE_EVERY  # sampled answers equal in-process onnxruntime's
    assert set(result.by_bucket) == {"16", "64", "256", "1024"}


@pytest.mark.parametrize("api", ["kserve", "v1"])
def test_streams_with_weights_at_concurrency_8(server: ServerProcess, in_process: Engine, api: str) -> None:
    target = build_target(api, LengthMix.parse("8-96"), pool=16, weights=True, reference=engine_reference(in_process))
    config = replace(MIXED_16, concurrency=8, duration_s=2.0, stream=True, check_every=3)
    result = run_load(server.address, target, config)
    assert result.sent == result.count > 16 and not result.errors, result.table()
    assert result.checked >= result.count // 3


def test_a_wrong_answer_under_load_is_caught(server: ServerProcess, in_process: Engine) -> None:
    """The sampled check can fail: against a reference off by 0.1%, every checked answer is BAD_RESPONSE."""
    target = build_target("kserve", MIX, reference=_off_by(engine_reference(in_process), 1.001))
    result = run_load(server.address, target, replace(MIXED_16, duration_s=1.0, check_every=2))
    assert result.errors == {BAD_RESPONSE: result.checked} and result.checked > 0
    assert result.sent == result.count + result.checked


def test_a_stream_under_load_answers_every_request_by_id(server: ServerProcess, in_process: Engine) -> None:
    inputs = {str(seed): _inputs(seed)[0] for seed in range(40)}

    async def run() -> dict[str, v1.AttendStreamResponse]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = v1_grpc.AttentionServiceStub(channel)
            requests = (v1.AttendRequest(id=rid, hidden_states=tensor_to_pb(x)) for rid, x in inputs.items())
            background = asyncio.gather(
                *(
                    stub.Attend(v1.AttendRequest(hidden_states=tensor_to_pb(_inputs(i)[0])), timeout=60)
                    for i in range(16)
                )
            )
            answers = {r.id: r async for r in stub.AttendStream(requests, timeout=60)}
            await background
            return answers

    answers = asyncio.run(run())
    assert set(answers) == set(inputs)
    for rid, answer in answers.items():
        assert answer.WhichOneof("result") == "response", answer.error
        if int(rid) % 5 == 0:
            output = tensor_from_pb("output", answer.response.output, ("b", "s", "d"), (v1.FP32,))
            assert relative_l2(output, in_process.run(inputs[rid], None, want_probs=False).output) <= 1e-5


def test_overload_far_above_capacity_gets_answers_not_hangs(server: ServerProcess) -> None:
    """256 callers of 512-token requests with 300 ms deadlines: about 20× what two cores can answer in time."""
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    x = np.random.default_rng(1).standard_normal((1, 512, D_MODEL), dtype=np.float32)
    request = v1.AttendRequest(hidden_states=tensor_to_pb(x)).SerializeToString()

    async def run() -> Counter:
        codes: Counter = Counter()
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.unary_unary("/attnserve.v1.AttentionService/Attend")

            async def caller() -> None:
                for _ in range(3):
                    try:
                        await call(request, timeout=0.3)
                        codes[grpc.StatusCode.OK] += 1
                    except grpc.aio.AioRpcError as e:
                        codes[e.code()] += 1

            await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(256))), timeout=60)
        return codes

    started = time.monotonic()
    codes = asyncio.run(run())
    assert sum(codes.values()) == 768 and set(codes) <= allowed, codes
    assert codes[grpc.StatusCode.DEADLINE_EXCEEDED] > 0, codes  # it really was overload
    assert time.monotonic() - started < 60
    time.sleep(2.0)  # let the server work off what it had accepted
    with grpc.insecure_channel(server.address) as channel:  # and it still serves
        response = v1_grpc.AttentionServiceStub(channel).Attend(
            v1.AttendRequest(hidden_states=tensor_to_pb(x[:, :16])), timeout=60
        )
    assert list(response.output.shape) == [1, 16, D_MODEL]


def test_a_slow_client_does_not_stall_others(server: ServerProcess) -> None:
    """One stream whose client never reads its answers; meanwhile other callers get theirs at normal speed."""
    big = np.random.default_rng(2).standard_normal((1, 512, D_MODEL), dtype=np.float32)
    small = np.random.default_rng(3).standard_normal((1, 16, D_MODEL), dtype=np.float32)

    async def run() -> list[float]:
        async with (
            grpc.aio.insecure_channel(server.address) as slow_channel,
            grpc.aio.insecure_channel(server.address) as fast_channel,
        ):
            slow = v1_grpc.AttentionServiceStub(slow_channel).AttendStream(
                (v1.AttendRequest(id=str(i), hidden_states=tensor_to_pb(big)) for i in range(30)), timeout=60
            )
            await asyncio.sleep(0.5)  # the slow stream's requests are in; nobody reads its answers
            fast = v1_grpc.AttentionServiceStub(fast_channel)
            latencies = []
            for _ in range(20):
                started = time.perf_counter()
                await fast.Attend(v1.AttendRequest(hidden_states=tensor_to_pb(small)), timeout=20)
                latencies.append(time.perf_counter() - started)
            slow.cancel()
            return latencies

    latencies = asyncio.run(run())
    assert len(latencies) == 20
    # The slow stream's 30 × 512-token runs take ~0.5 s of compute in all; a stalled server would show seconds here.
    assert max(latencies) < 5.0, latencies
