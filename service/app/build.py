"""The service's parts, each built by one small step from the settings: AttnServer (server.py) calls them in order."""

from __future__ import annotations

import logging
import os
import ssl
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service import __version__
from service._pb.attnserve.v1 import attention_pb2, attention_pb2_grpc
from service._pb.inference import grpc_service_pb2, grpc_service_pb2_grpc
from service.api.gate import CallGate, GatePolicy, MethodTable
from service.api.http_server import HttpEdge, HttpListener, HttpPolicy
from service.api.kserve import KServeServicer
from service.api.v1 import AttentionServicer
from service.app.settings import Secrets, Settings
from service.core.dataplane import DataPlane
from service.core.limits import Limits
from service.engine.batching import BatchPolicy
from service.engine.model_dir import ModelDirectory
from service.engine.sessions import Engine
from service.host.thread_priority import call_on_lowered_thread
from service.observe.requests import Observer
from service.observe.trace_config import TraceConfig

if TYPE_CHECKING:
    from service.observe.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    attention_pb2.DESCRIPTOR.services_by_name["AttentionService"].full_name,
)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
GPU_BATCH_TOKENS = 16384


def tracing(config: TraceConfig, settings: Settings) -> Tracing | None:
    """The tracer when the OTEL_* variables turn tracing on (trace_config.py), else None: nothing of OpenTelemetry
    is imported then, and the request path checks one `is None`."""
    if not config.enabled:
        log.info("tracing: %s", config.describe())
        return None
    from service.observe.tracing import Tracing  # only now: OpenTelemetry takes a quarter of a second to import

    tracer = Tracing(config, __version__, settings.model_name, dict(zip(("kserve", "v1"), SERVICE_NAMES, strict=True)))
    log.info("tracing: %s", tracer.describe())
    return tracer


def engine(settings: Settings, model: ModelDirectory) -> Engine:
    """The onnxruntime sessions, created on a lowered thread: their intra-op threads inherit its priority."""
    built = call_on_lowered_thread(
        lambda: Engine(
            model, settings.provider, settings.intra_op_threads, settings.allow_spinning, settings.narrow_max_tokens
        ),
        settings.engine_nice,
    )
    log.info("provider %s: %s; %d intra-op threads", built.provider, built.provider_reason, built.intra_op_threads)
    return built


def limits(settings: Settings, model: ModelDirectory) -> Limits:
    max_seq = min(settings.max_seq_len or model.max_seq_len, model.max_seq_len)
    return Limits(
        d_model=model.d_model,
        num_heads=model.num_heads,
        max_seq_len=max_seq,
        max_batch_size=settings.max_batch_size,
        max_weights_seq_len=min(settings.max_weights_seq_len, max_seq),
        max_message_bytes=settings.max_message_bytes,
    )


def method_table(
    dataplane: DataPlane, observer: Observer, health: health_aio.HealthServicer, settings: Settings
) -> MethodTable:
    """Every method the gRPC port serves: both APIs, health, and reflection v1alpha and v1."""
    table = MethodTable()
    pending = settings.max_stream_pending
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(dataplane, settings.model_name, observer, pending), table
    )
    attention_pb2_grpc.add_AttentionServiceServicer_to_server(
        AttentionServicer(dataplane, settings.model_name, observer, pending), table
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, table)
    names = (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), table)
    _reflection_v1(table, (*names, REFLECTION_V1))
    return table


def streams_per_connection(settings: Settings) -> int:
    """The HTTP/2 stream cap per connection: the setting, else max_concurrent_rpcs and the probes' room. Not the
    budget's lower call cap: the calls past it are refused by the gate with RESOURCE_EXHAUSTED, while a stream
    cap a busy client exceeds is refused at the HTTP/2 layer (REFUSED_STREAM, seen as UNAVAILABLE)."""
    return settings.max_streams_per_connection or settings.max_concurrent_rpcs + PROBE_HEADROOM


def grpc_server(gate: CallGate, settings: Settings) -> grpc.aio.Server:
    return grpc.aio.server(
        handlers=[gate],
        options=_channel_options(settings, streams_per_connection(settings)),
        maximum_concurrent_rpcs=gate.policy.max_calls + PROBE_HEADROOM,
    )


def health_server(settings: Settings, health: health_aio.HealthServicer) -> grpc.aio.Server | None:
    """kubelet's gRPC probes speak no TLS: with TLS on, they need health on a plaintext port of its own."""
    if settings.health_port is None:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server


# gRPC's receive window each stream starts with, and keeps while its bandwidth-delay probing is off (the default).
RECEIVE_WINDOW_BYTES = 16 << 20
# Calls that hold no slot of ours (health Check) still count in gRPC's own limit: room for them above ours.
PROBE_HEADROOM = 64


def _reflection_v1(table: MethodTable, names: tuple[str, ...]) -> None:
    """grpcio-reflection ships v1alpha only; v1 has the same messages under a new name, so serve both."""
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    table.add_registered_method_handlers(REFLECTION_V1, {"ServerReflectionInfo": handler})


def _channel_options(settings: Settings, streams_per_connection: int) -> list[tuple[str, int]]:
    """streams_per_connection: the cap when the setting leaves it to the server (0)."""
    age = (
        [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1e3)),
         ("grpc.max_connection_age_grace_ms", int(settings.drain_grace_s * 1e3))]
        if settings.max_connection_age_s > 0 else []
    )  # fmt: skip
    return [
        *age,
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1e3)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1e3)),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1e3)),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection or streams_per_connection),
        # Let clients keep idle connections alive with pings every 10 s without being sent GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        # Off by default: with it, what a client can make the server buffer unread grows with the window gRPC
        # estimates (streams_never_read read 40-78 requests per stream instead of 5-15, RSS over its bound).
        ("grpc.http2.bdp_probe", int(settings.grpc_bdp_probe)),
        # The window each stream starts with, and keeps with probing off: a big message still arrives about as
        # fast as with probing on loopback (32 MiB in 77-101 ms, against 85 with probing and 105 with gRPC's
        # 64 KiB default), and what a stream can leave unread stays at this much (streams_never_read: 13-15
        # requests, +489 MiB).
        ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Off by default: a port already taken is an error, not a silent share.
        ("grpc.so_reuseport", int(settings.reuse_port)),
    ]


def credentials(secrets: Secrets) -> grpc.ServerCredentials | None:
    if secrets.tls_cert is None or secrets.tls_key is None:
        return None
    return grpc.ssl_server_credentials(
        [(secrets.tls_key, secrets.tls_cert)],
        root_certificates=secrets.tls_client_ca,
        require_client_auth=secrets.tls_client_ca is not None,
    )


def http_listener(dataplane: DataPlane, observer: Observer, gate: CallGate, settings: Settings) -> HttpListener | None:
    """The REST port's routes and bounds (None when http_port is -1): the gate's token, slots and body timeout."""
    if settings.http_port < 0:
        return None
    policy = HttpPolicy(
        token=gate.policy.token,
        max_body_bytes=settings.max_message_bytes,
        body_timeout_s=gate.policy.body_timeout_s,
        max_connections=settings.http_max_connections,
    )
    return HttpListener(HttpEdge(dataplane, settings.model_name, observer, gate, policy))


def http_tls(secrets: Secrets) -> ssl.SSLContext | None:
    """The gRPC port's certificate, key and client CA for the REST port. ssl loads a key only from a file: it is
    passed through an anonymous in-memory file, so the bytes read at start are the ones served, as for gRPC."""
    if secrets.tls_cert is None or secrets.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    files = []
    try:
        for data in (secrets.tls_cert, secrets.tls_key):
            fd = os.memfd_create("attnserve-tls")
            os.write(fd, data)
            files.append(fd)
        context.load_cert_chain(f"/proc/self/fd/{files[0]}", f"/proc/self/fd/{files[1]}")
    finally:
        for fd in files:
            os.close(fd)
    if secrets.tls_client_ca is not None:
        context.load_verify_locations(cadata=secrets.tls_client_ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def gate_policy(settings: Settings, budget: int, token: str | None) -> GatePolicy:
    """The call gate's bounds: calls at once are capped so that their messages, each up to max_message_bytes,
    fit the memory budget (a message is read whole before anything of ours can refuse it)."""
    calls = max(1, min(settings.max_concurrent_rpcs, budget // settings.max_message_bytes))
    return GatePolicy(
        token=token,
        max_calls=calls,
        max_streams=min(settings.max_concurrent_streams, calls),
        body_timeout_s=settings.body_timeout_s,
    )


def observed_methods() -> dict[str, tuple[str, str]]:
    """The inference methods, by path, with their metric labels (api, method)."""
    services = {
        "kserve": grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        "v1": attention_pb2.DESCRIPTOR.services_by_name["AttentionService"],
    }
    inference = {"ModelInfer", "ModelStreamInfer", "Attend", "AttendStream"}
    return {
        f"/{service.full_name}/{method.name}": (api, method.name)
        for api, service in services.items()
        for method in service.methods
        if method.name in inference
    }


def batch_policy(settings: Settings, engine: Engine) -> BatchPolicy:
    """The batcher's policy from the settings; max_batch_tokens 0 picks a budget for the provider."""
    auto_tokens = GPU_BATCH_TOKENS if engine.provider == "cuda" else (engine.narrow_max_tokens or 512)
    return BatchPolicy(
        max_batch_size=settings.max_batch_sequences,
        max_batch_tokens=settings.max_batch_tokens or auto_tokens,
        max_queue_delay_s=settings.max_queue_delay_us * 1e-6,
        max_padding=settings.max_batch_padding,
        max_queue_requests=settings.max_queue_requests,
        max_queue_tokens=settings.max_queue_tokens,
        max_queue_wait_s=settings.max_queue_wait_ms * 1e-3,
        seq_buckets=settings.seq_bucket_bounds,
    )
