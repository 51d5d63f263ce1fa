"""Assembly: engine, batcher and core; the aio server with servicers, health, reflection, auth and TLS; drain."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service._pb.attnserve.v1 import attention_pb2, attention_pb2_grpc
from service._pb.inference import grpc_service_pb2, grpc_service_pb2_grpc
from service.api.gate import CallGate, GatePolicy, MethodTable
from service.api.kserve import KServeServicer
from service.api.v1 import AttentionServicer
from service.batcher import Batcher
from service.batching import BatchPolicy
from service.dataplane import DataPlane
from service.engine import Engine, usable_cores
from service.errors import ListenError
from service.limits import Limits
from service.memory_budget import MemoryBudget
from service.memory_limit import memory_budget
from service.metrics import Metrics, NullMetrics
from service.model_dir import load_model_directory
from service.observe import AccessLog, Observer
from service.settings import Secrets, Settings, read_secrets
from service.thread_priority import call_on_lowered_thread

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    attention_pb2.DESCRIPTOR.services_by_name["AttentionService"].full_name,
)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH_NAMES = ("", *SERVICE_NAMES)  # "" is the whole server
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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


def _channel_options(settings: Settings) -> list[tuple[str, int]]:
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
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Let clients keep idle connections alive with pings every 10 s without being sent GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Off by default: a port already taken is an error, not a silent share.
        ("grpc.so_reuseport", int(settings.reuse_port)),
    ]


def _credentials(secrets: Secrets) -> grpc.ServerCredentials | None:
    if secrets.tls_cert is None or secrets.tls_key is None:
        return None
    return grpc.ssl_server_credentials(
        [(secrets.tls_key, secrets.tls_cert)],
        root_certificates=secrets.tls_client_ca,
        require_client_auth=secrets.tls_client_ca is not None,
    )


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


GPU_BATCH_TOKENS = 16384


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


class AttnServer:
    """The whole service; `start`, then `drain` (on SIGTERM) or `stop`."""

    def __init__(self, settings: Settings, secrets: Secrets | None = None) -> None:
        """secrets: the token and TLS files as checked at start (read_secrets); None reads them now."""
        self.settings = settings
        self.secrets = secrets if secrets is not None else read_secrets(settings)
        model = load_model_directory(settings.model_dir)
        self.engine = call_on_lowered_thread(  # onnxruntime's intra-op threads inherit the lowered priority
            lambda: Engine(
                model, settings.provider, settings.intra_op_threads, settings.allow_spinning, settings.narrow_max_tokens
            ),
            settings.engine_nice,
        )
        log.info(
            "provider %s: %s; %d intra-op threads",
            self.engine.provider,
            self.engine.provider_reason,
            self.engine.intra_op_threads,
        )
        max_seq = min(settings.max_seq_len or model.max_seq_len, model.max_seq_len)
        self.limits = Limits(
            d_model=model.d_model,
            num_heads=model.num_heads,
            max_seq_len=max_seq,
            max_batch_size=settings.max_batch_size,
            max_weights_seq_len=min(settings.max_weights_seq_len, max_seq),
            max_message_bytes=settings.max_message_bytes,
        )
        metrics_type = Metrics if settings.metrics else NullMetrics
        self.metrics = metrics_type(settings.seq_bucket_bounds)
        self.batcher = Batcher(
            self.engine,
            batch_policy(settings, self.engine),
            settings.engine_workers or usable_cores(),
            self.metrics,
            nice=settings.engine_nice,
        )
        budget, budget_source = memory_budget(settings.memory_budget_mb)
        self.dataplane = DataPlane(self.batcher, self.limits, self.metrics, MemoryBudget(budget))
        log.info("batching: %s; %d engine threads", self.batcher.policy.describe(), self.batcher.workers)
        self.metrics.set_model_info(
            settings.model_name, model.d_model, model.num_heads, self.engine.provider, model.weights_sha256
        )
        self.metrics.track(lambda: self.dataplane.inflight, lambda: self.batcher.queue_depth)
        self.access_log = AccessLog(sys.stdout, settings.access_log) if settings.access_log != "off" else None
        self._flusher: asyncio.Task[None] | None = None
        observer = Observer(self.metrics, self.access_log)
        self.health = health_aio.HealthServicer()
        policy = gate_policy(settings, budget, self.secrets.token)
        log.info(
            "limits: memory budget %d MiB (%s); at most %d calls at once (%d streaming, %d answers pending per "
            "stream, %d per connection), messages ≤ %d MiB, request message due %g s after the headers",
            budget >> 20, budget_source, policy.max_calls, policy.max_streams, settings.max_stream_pending,
            settings.max_streams_per_connection, settings.max_message_bytes >> 20, policy.body_timeout_s,
        )  # fmt: skip
        table = MethodTable()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.dataplane, self.engine, settings, observer), table
        )
        attention_pb2_grpc.add_AttentionServiceServicer_to_server(
            AttentionServicer(self.dataplane, self.engine, settings.model_name, observer, settings.max_stream_pending),
            table,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, table)
        names = (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), table)
        _reflection_v1(table, (*names, REFLECTION_V1))
        self.gate = CallGate(table, policy, observer, observed_methods())
        self.server = grpc.aio.server(
            handlers=[self.gate],
            options=_channel_options(settings),
            maximum_concurrent_rpcs=policy.max_calls + PROBE_HEADROOM,
        )
        # kubelet's gRPC probes speak no TLS: with TLS on, they need health on a plaintext port of its own.
        self.health_server: grpc.aio.Server | None = None
        if settings.health_port is not None:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.grpc_port = 0
        self.metrics_port = 0
        self.health_port = 0

    async def start(self) -> None:
        """Listen (health NOT_SERVING), warm up, then report ready."""
        for name in HEALTH_NAMES:
            await self.health.set(name, NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        credentials = _credentials(self.secrets)
        try:
            if credentials is None:
                self.grpc_port = self.server.add_insecure_port(address)
            else:
                self.grpc_port = self.server.add_secure_port(address, credentials)
        except RuntimeError as e:  # grpcio's way of saying the port is taken, or that the TLS files are not
            hint = "; with TLS, also check that tls_cert and tls_key are a matching PEM certificate and key"
            raise ListenError(f"gRPC cannot listen on {address}: {e}{hint if credentials else ''}") from None
        if self.health_server is not None:
            health_address = f"{self.settings.host}:{self.settings.health_port}"
            try:
                self.health_port = self.health_server.add_insecure_port(health_address)
            except RuntimeError as e:
                raise ListenError(f"health cannot listen on {health_address}: {e}") from None
            await self.health_server.start()
        metrics_host = self.settings.metrics_host or self.settings.host
        try:
            if self.metrics.enabled:
                self.metrics_port = self.metrics.serve(metrics_host, self.settings.metrics_port)
        except OSError as e:
            raise ListenError(f"metrics cannot listen on {metrics_host}:{self.settings.metrics_port}: {e}") from None
        await self.server.start()
        if self.access_log is not None:
            self._flusher = asyncio.create_task(self.access_log.flush_periodically())
        if self.settings.warmup:
            seconds = await asyncio.to_thread(self.engine.warm_up, self.limits.max_weights_seq_len)
            log.info("warm-up done in %.2f s", seconds)
        self.dataplane.ready = True
        for name in HEALTH_NAMES:
            await self.health.set(name, SERVING)
        log.info(
            "attnserve ready: grpc %s:%d (%s), metrics %s, model %s, provider %s%s",
            self.settings.host,
            self.grpc_port,
            "tls" if credentials else "plaintext",
            f":{self.metrics_port}" if self.metrics.enabled else "off",
            self.settings.model_dir,
            self.engine.provider,
            f", health :{self.health_port} (plaintext)" if self.health_server is not None else "",
        )

    async def drain(self) -> bool:
        """Stop taking work, let in-flight requests finish within the grace period, stop. True if all finished."""
        started = time.monotonic()
        self.dataplane.ready = False  # new requests: UNAVAILABLE; ServerReady: false
        await self.health.enter_graceful_shutdown()
        inflight = self.dataplane.inflight
        # GOAWAY now, not once the work is done: clients send new calls to other replicas at once, while the calls
        # in flight finish and their answers go out whole within the grace period.
        stopping = asyncio.create_task(self.server.stop(grace=self.settings.drain_grace_s))
        finished = await self.dataplane.wait_idle(self.settings.drain_grace_s)
        log.info(
            "drain: %d in flight at SIGTERM, %s after %.2f s",
            inflight,
            "all finished" if finished else "grace period over",
            time.monotonic() - started,
        )
        await stopping
        await self._release()
        return finished

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)  # answers already computed still go out
        await self._release()

    async def _release(self) -> None:
        """Everything but the gRPC server, once it has stopped."""
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        await asyncio.to_thread(self.batcher.close)
        self.metrics.close()
        if self._flusher is not None:
            self._flusher.cancel()
        if self.access_log is not None:
            self.access_log.flush()
