"""OpenTelemetry tracing end to end: a real server exporting to real OTLP receivers on loopback (OTLP/HTTP and
OTLP/gRPC, decoded with opentelemetry-proto), driven over both gRPC APIs with a known W3C traceparent.

Checked: each request's SERVER span continues the caller's trace (trace id, parent span id) with the rpc semantic
conventions and our attributes; its queue (when it waited) and compute children; one run span per engine run of
several requests, linked to every request it served, and each compute span linked back to it (a run of one request
is its compute span); the trace id in the request
histogram's exemplar; an unsampled caller's request exports nothing. With tracing not configured, or configured
off, the server never imports OpenTelemetry (so creates none of its objects and exports nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._pb.attnserve.v1 import attention_pb2 as v1
from service.api.v1_codec import tensor_to_pb
from tests.load.workload import kserve_request
from tests.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, ReceivedSpan
from tests.server_process import ServerProcess, start_server

D_MODEL = 512
SERVER = 2  # opentelemetry.proto Span.SpanKind
ERROR = 2  # Status.StatusCode
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "attnserve-test"}  # export every 50 ms
NO_WARMUP = ("--warmup", "false")


@dataclass(frozen=True)
class Edge:
    """One way to call the server: the API label its spans carry, rpc.service, rpc.method, and a call that sends
    hidden states of a shape with the given metadata and returns the gRPC status code."""

    api: str
    service: str
    method: str
    payload: Callable[[np.ndarray], bytes]

    @property
    def span_name(self) -> str:
        return f"{self.service}/{self.method}"

    def conventions(self) -> dict[str, str | int]:
        return {"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": self.method, "rpc.grpc.status_code": 0}

    async def call(self, server: ServerProcess | str, x: np.ndarray, metadata: tuple[tuple[str, str], ...]) -> str:
        """The call's outcome: "OK" or the gRPC status code's name."""
        address = server if isinstance(server, str) else server.address
        async with grpc.aio.insecure_channel(address) as channel:
            unary = channel.unary_unary(f"/{self.service}/{self.method}")
            try:
                await unary(self.payload(x), metadata=metadata, timeout=60)
            except grpc.aio.AioRpcError as e:
                return e.code().name
            return "OK"


KSERVE = Edge("kserve", "inference.GRPCInferenceService", "ModelInfer", lambda x: kserve_request(x).SerializeToString())
V1 = Edge(
    "v1",
    "attnserve.v1.AttentionService",
    "Attend",
    lambda x: v1.AttendRequest(hidden_states=tensor_to_pb(x)).SerializeToString(),
)


@dataclass(frozen=True)
class HttpEdge:
    """KServe v2 over HTTP/REST: a JSON infer POSTed with the caller's trace headers; HTTP's span conventions."""

    api: str = "http"
    route: str = "/v2/models/{model_name}/infer"

    @property
    def span_name(self) -> str:
        return f"POST {self.route}"

    def conventions(self) -> dict[str, str | int]:
        return {"http.request.method": "POST", "http.route": self.route}

    async def call(self, server: ServerProcess, x: np.ndarray, metadata: tuple[tuple[str, str], ...]) -> str:
        body = {"inputs": [{"name": "hidden_states", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        request = urllib.request.Request(
            f"http://{server.http_address}/v2/models/attention/infer", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **dict(metadata)}, method="POST",
        )  # fmt: skip
        try:
            await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=60).read())
        except urllib.error.HTTPError as e:
            return str(e.code)
        return "OK"


HTTP = HttpEdge()
EDGES: list[Edge | HttpEdge] = [KSERVE, V1, HTTP]


def _x(seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, seq, D_MODEL), dtype=np.float32)


def _traceparent(sampled: bool = True) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(trace id, the caller's span id, metadata carrying them)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    flags = "01" if sampled else "00"
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-{flags}"), ("tracestate", "caller=1"))


def _of_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.trace_id == trace_id}


def _runs_linking(spans: list[ReceivedSpan], trace_id: str, span_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == "attnserve.run" and (trace_id, span_id) in s.links]


def _exemplar_trace_ids(server: ServerProcess) -> set[str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.metrics_port}/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    body = urllib.request.urlopen(request, timeout=10).read().decode()
    lines = [line for line in body.splitlines() if line.startswith("attnserve_request_duration_seconds_bucket")]
    return {line.split('trace_id="', 1)[1][:32] for line in lines if 'trace_id="' in line}


@pytest.fixture(scope="module")
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def traced(served_model: Path, http_receiver: OtlpHttpReceiver) -> Iterator[ServerProcess]:
    """Default settings (small lone requests compute at once on the event loop), OTLP/HTTP, everything sampled
    that its caller did not decline."""
    env = {**FAST, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": http_receiver.endpoint}
    process = start_server(served_model, *NO_WARMUP, env=env)
    yield process
    assert process.stop() == 0


@pytest.mark.parametrize("edge", EDGES, ids=lambda e: e.api)
@pytest.mark.parametrize("seq", [16, 256], ids=["inline", "queued"])
def test_a_call_continues_the_callers_trace_with_queue_and_compute_spans(
    traced: ServerProcess, http_receiver: OtlpHttpReceiver, edge: Edge, seq: int
) -> None:
    trace_id, caller, metadata = _traceparent()
    assert asyncio.run(edge.call(traced, _x(seq), metadata)) == "OK"
    name = edge.span_name
    spans = http_receiver.received.wait_for(lambda got: {name, "attnserve.compute"} <= _of_trace(got, trace_id).keys())
    mine = _of_trace(spans, trace_id)
    server = mine[name]
    assert (server.parent_span_id, server.kind, server.status_code) == (caller, SERVER, 0)
    assert server.resource["service.name"] == "attnserve-test"
    assert server.attributes == server.attributes | edge.conventions() | {
        "attnserve.api": edge.api, "attnserve.model": "attention", "attnserve.code": "OK",
        "attnserve.seq_len": seq, "attnserve.seq_bucket": str(seq), "attnserve.batch_size": 1,
    }  # fmt: skip
    compute = mine["attnserve.compute"]
    assert compute.parent_span_id == server.span_id
    assert server.start_ns <= compute.start_ns <= compute.end_ns <= server.end_ns
    # A run of this request alone: its compute span describes the run, and no run span repeats it.
    assert compute.attributes["attnserve.requests"] == 1 and compute.attributes["attnserve.longest"] == seq
    assert compute.links == () and not _runs_linking(spans, trace_id, server.span_id)
    if seq == 16:  # computed at once on the event loop: it never waited
        assert "attnserve.queue" not in mine
    else:  # past inline_max_tokens: queued for an engine thread
        queue = mine["attnserve.queue"]
        assert queue.parent_span_id == server.span_id
        assert server.start_ns <= queue.start_ns <= queue.end_ns == compute.start_ns
    assert trace_id in _exemplar_trace_ids(traced)


def test_a_failed_call_is_traced_with_its_status(traced: ServerProcess, http_receiver: OtlpHttpReceiver) -> None:
    trace_id, caller, metadata = _traceparent()
    too_wide = np.zeros((1, 8, D_MODEL + 1), dtype=np.float32)
    assert asyncio.run(V1.call(traced, too_wide, metadata)) == "INVALID_ARGUMENT"
    name = f"{V1.service}/{V1.method}"
    server = _of_trace(http_receiver.received.wait_for(lambda got: name in _of_trace(got, trace_id)), trace_id)[name]
    assert server.parent_span_id == caller
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert server.status_code == 0  # a client's fault is no server error (gRPC semantic conventions)


def test_a_caller_that_declines_sampling_gets_nothing_exported(
    traced: ServerProcess, http_receiver: OtlpHttpReceiver
) -> None:
    declined, _, unsampled = _traceparent(sampled=False)
    assert asyncio.run(KSERVE.call(traced, _x(16), unsampled)) == "OK"
    later, _, sampled = _traceparent()
    assert asyncio.run(KSERVE.call(traced, _x(16), sampled)) == "OK"
    # Spans leave in the order they end: once the later call's arrived, the earlier one's would have too.
    spans = http_receiver.received.wait_for(lambda got: bool(_of_trace(got, later)))
    assert not _of_trace(spans, declined)
    assert declined not in _exemplar_trace_ids(traced) and later in _exemplar_trace_ids(traced)


@pytest.fixture(scope="module")
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    receiver = OtlpGrpcReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def batching(served_model: Path, grpc_receiver: OtlpGrpcReceiver) -> Iterator[ServerProcess]:
    """OTLP/gRPC export, with the OTLP endpoint variable alone turning tracing on; one engine thread whose runs
    take four sequences, a long queue delay so that four calls sent together run as one."""
    env = {**FAST, "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    flags = ("--engine-workers", "1", "--max-batch-sequences", "4", "--max-queue-delay-us", "10000000")
    process = start_server(served_model, *NO_WARMUP, *flags, env=env)
    yield process
    assert process.stop() == 0


def test_one_run_span_links_every_request_it_served_over_otlp_grpc(
    batching: ServerProcess, grpc_receiver: OtlpGrpcReceiver
) -> None:
    callers = [_traceparent() for _ in range(4)]

    async def together() -> list[str]:
        calls = [(KSERVE if i % 2 else V1).call(batching.address, _x(64, i), m) for i, (_, _, m) in enumerate(callers)]
        return await asyncio.gather(*calls)

    assert asyncio.run(together()) == ["OK"] * 4
    spans = grpc_receiver.received.wait_for(
        lambda got: (
            sum(1 for s in got if s.name == "attnserve.compute") >= 4 and any(s.name == "attnserve.run" for s in got)
        )
    )
    servers = {t: s for t, _, _ in callers for s in spans if s.trace_id == t and s.kind == SERVER}
    assert {t: s.parent_span_id for t, s in servers.items()} == {t: caller for t, caller, _ in callers}
    (run,) = [s for s in spans if s.name == "attnserve.run"]
    assert set(run.links) == {(t, s.span_id) for t, s in servers.items()}
    assert run.attributes["attnserve.requests"] == 4 and run.attributes["attnserve.rows"] == 4
    for trace_id, server in servers.items():
        mine = [s for s in spans if s.trace_id == trace_id and s.parent_span_id == server.span_id]
        assert sorted(s.name for s in mine) == ["attnserve.compute", "attnserve.queue"]
        compute = next(s for s in mine if s.name == "attnserve.compute")
        assert compute.links == ((run.trace_id, run.span_id),)
        assert (compute.start_ns, compute.end_ns) == (run.start_ns, run.end_ns)


# --- tracing off: OpenTelemetry never even imported ---------------------------------------------------------------

# The real server, in a process of its own whose environment holds only the OTEL_* variables given: it starts, serves
# a call that carries a traceparent, drains, and prints the OpenTelemetry modules it loaded.
PROBE = """
import asyncio, logging, os, sys
import grpc
from service.app.settings import Settings, read_secrets
from service.app.server import AttnServer
from service.observe.trace_config import TraceConfig
from tests.load.workload import kserve_request
import numpy as np

logging.basicConfig(level="INFO")

async def main():
    settings = Settings(model_dir=sys.argv[1], host="127.0.0.1", grpc_port=0, metrics_port=0, warmup=False)
    server = AttnServer(settings, read_secrets(settings), TraceConfig.from_env(os.environ))
    await server.start()
    x = np.zeros((1, 16, 512), dtype=np.float32)
    tp = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await call(kserve_request(x).SerializeToString(), metadata=tp, timeout=60)
    await server.drain()
    print("loaded:", sorted(m for m in sys.modules if m.startswith("opentelemetry")))

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "otel_env",
    [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}],
    ids=["not-configured", "sdk-disabled", "exporter-none"],
)
def test_with_tracing_off_opentelemetry_is_never_loaded_and_nothing_exported(
    served_model: Path, otel_env: dict[str, str]
) -> None:
    receiver = OtlpHttpReceiver()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel_env
    if otel_env:  # configured, and switched off: the endpoint alone would turn it on
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = receiver.endpoint
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(served_model)], capture_output=True, text=True, env=env, cwd=root, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout, result.stdout
    assert "tracing: off" in result.stderr, result.stderr[-3000:]
    receiver.close()
    assert receiver.received.exports == 0
