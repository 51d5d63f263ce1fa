"""Load against the real server: mixed lengths at concurrency 16 on both APIs, streams, overload, a slow client.

Every loop is bounded in count and time. Sampled answers are checked against in-process onnxruntime on the
same inputs (the service's own Engine, CPU), so a fast wrong answer fails.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from model.reference import relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service._pb.inference import grpc_service_pb2 as kserve
from service._pb.inference import grpc_service_pb2_grpc as kserve_grpc
from service.api.v1_codec import tensor_from_pb, tensor_to_pb
from service.engine import Engine
from service.model_dir import load_model_directory
from tests.load.loadgen import kserve_request
from tests.server_process import ServerProcess

pytestmark = pytest.mark.load

D_MODEL = 512
LENGTHS = (8, 16, 33, 64, 128, 200, 256, 384, 512)
SAMPLE_EVERY = 7  # one answer in seven is checked against in-process onnxruntime


@pytest.fixture(scope="module")
def in_process(served_model: Path) -> Engine:
    return Engine(load_model_directory(served_model), "cpu")


def _inputs(seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    seq = int(rng.choice(LENGTHS))
    return rng.standard_normal((1, seq, D_MODEL), dtype=np.float32), seq


def _kserve_output(response: kserve.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


async def _mixed_load(address: str, api: str, concurrency: int, seconds: float, max_per_worker: int) -> dict:
    sent, codes, samples = 0, Counter(), []
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        kserve_stub, v1_stub = kserve_grpc.GRPCInferenceServiceStub(channel), v1_grpc.AttentionServiceStub(channel)

        async def worker(index: int) -> None:
            nonlocal sent
            for n in range(max_per_worker):  # bounded in count and in time
                if time.monotonic() >= stop_at:
                    return
                seed = index * 100_000 + n
                x, _ = _inputs(seed)
                sent += 1
                try:
                    if api == "kserve":
                        output = _kserve_output(
                            await kserve_stub.ModelInfer(kserve_request(x, request_id=str(seed)), timeout=30)
                        )
                    else:
                        response = await v1_stub.Attend(
                            v1.AttendRequest(id=str(seed), hidden_states=tensor_to_pb(x)), timeout=30
                        )
                        output = tensor_from_pb("output", response.output, ("b", "s", "d"), (v1.FP32,))
                    codes[grpc.StatusCode.OK] += 1
                    if seed % SAMPLE_EVERY == 0:
                        samples.append((x, output))
                except grpc.aio.AioRpcError as e:
                    codes[e.code()] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"sent": sent, "codes": codes, "samples": samples}


@pytest.mark.parametrize("api", ["kserve", "v1"])
def test_mixed_lengths_at_concurrency_16(server: ServerProcess, in_process: Engine, api: str) -> None:
    outcome = asyncio.run(_mixed_load(server.address, api, concurrency=16, seconds=4.0, max_per_worker=400))
    codes = outcome["codes"]
    assert sum(codes.values()) == outcome["sent"] > 32  # every request sent was answered
    assert codes == Counter({grpc.StatusCode.OK: outcome["sent"]}), codes
    assert outcome["samples"]
    for x, output in outcome["samples"]:
        assert relative_l2(output, in_process.run(x, None, want_probs=False).output) <= 1e-5


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
