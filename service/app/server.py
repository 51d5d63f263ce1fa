"""The whole service: its parts built in order (service/app/build.py), start, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
import time

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from service.api.gate import CallGate
from service.api.status import code_name
from service.app import build
from service.app.settings import Secrets, Settings, read_secrets
from service.core.dataplane import DataPlane
from service.core.errors import ListenError
from service.core.memory_budget import MemoryBudget
from service.engine.batcher import Batcher
from service.engine.model_dir import load_model_directory
from service.host.cpu_quota import usable_cores
from service.host.memory_limit import memory_budget
from service.observe.metrics import Metrics, NullMetrics
from service.observe.requests import AccessLog, Observer
from service.observe.trace_config import TraceConfig

log = logging.getLogger(__name__)

HEALTH_NAMES = ("", *build.SERVICE_NAMES)  # "" is the whole server
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class AttnServer:
    """The whole service; `start`, then `drain` (on SIGTERM) or `stop`."""

    def __init__(self, settings: Settings, secrets: Secrets | None = None, trace: TraceConfig | None = None) -> None:
        """secrets: the token and TLS files as checked at start (read_secrets); None reads them now. trace: what the
        OTEL_* variables ask for (TraceConfig.from_env); None: tracing off."""
        self.settings = settings
        self.secrets = secrets if secrets is not None else read_secrets(settings)
        model = load_model_directory(settings.model_dir)
        self.engine = build.engine(settings, model)
        self.metrics = (Metrics if settings.metrics else NullMetrics)(settings.seq_bucket_bounds)
        workers = settings.engine_workers or usable_cores()
        policy = build.batch_policy(settings, self.engine)
        self.batcher = Batcher(
            self.engine,
            policy,
            workers,
            self.metrics,
            nice=settings.engine_nice,
            inline_max_tokens=settings.inline_max_tokens,
        )
        log.info("batching: %s; %d engine threads", policy.describe(), workers)
        budget, budget_source = memory_budget(settings.memory_budget_mb)
        limits = build.limits(settings, model)
        self.dataplane = DataPlane(self.batcher, limits, self.metrics, MemoryBudget(budget))
        self.metrics.set_model_info(
            settings.model_name, model.d_model, model.num_heads, self.engine.provider, model.weights_sha256
        )
        self.metrics.track(lambda: self.dataplane.inflight, lambda: self.batcher.queue_depth)
        self.access_log = AccessLog(sys.stdout, settings.access_log) if settings.access_log != "off" else None
        self._flusher: asyncio.Task[None] | None = None
        self.tracing = build.tracing(trace or TraceConfig(False, "not configured"), settings)
        self.batcher.recorder.tracing = self.tracing
        observer = Observer(self.metrics, code_name, self.access_log, self.tracing)
        self.health = health_aio.HealthServicer()
        gate_policy = build.gate_policy(settings, budget, self.secrets.token)
        log.info(
            "limits: memory budget %d MiB (%s); at most %d calls at once (%d streaming, %d answers pending per "
            "stream, %d per connection), messages ≤ %d MiB, request message due %g s after the headers",
            budget >> 20, budget_source, gate_policy.max_calls, gate_policy.max_streams,
            settings.max_stream_pending, build.streams_per_connection(settings),
            settings.max_message_bytes >> 20,
            gate_policy.body_timeout_s,
        )  # fmt: skip
        table = build.method_table(self.dataplane, observer, self.health, settings)
        self.gate = CallGate(table, gate_policy, observer, build.observed_methods())
        self.batcher.lone_call = self.gate.lone
        self.server = build.grpc_server(self.gate, settings)
        self.http = build.http_listener(self.dataplane, observer, self.gate, settings)
        self.health_server = build.health_server(settings, self.health)
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.health_port = 0

    async def start(self) -> None:
        """Listen (health NOT_SERVING), warm up, then report ready."""
        for name in HEALTH_NAMES:
            await self.health.set(name, NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        credentials = build.credentials(self.secrets)
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
        if self.http is not None:
            http_address = f"{self.settings.host}:{self.settings.http_port}"
            try:
                self.http_port = await self.http.start(
                    self.settings.host, self.settings.http_port, build.http_tls(self.secrets)
                )
            except (OSError, ssl.SSLError) as e:  # the port is taken, or the TLS files are not a matching pair
                raise ListenError(f"HTTP cannot listen on {http_address}: {e}") from None
        if self.access_log is not None:
            self._flusher = asyncio.create_task(self.access_log.flush_periodically())
        if self.settings.warmup:
            seconds = await asyncio.to_thread(self.engine.warm_up, self.dataplane.limits.max_weights_seq_len)
            log.info("warm-up done in %.2f s", seconds)
        self.dataplane.ready = True
        for name in HEALTH_NAMES:
            await self.health.set(name, SERVING)
        log.info(
            "attnserve ready: grpc %s:%d (%s), metrics %s, http %s, model %s, provider %s%s",
            self.settings.host,
            self.grpc_port,
            "tls" if credentials else "plaintext",
            f":{self.metrics_port}" if self.metrics.enabled else "off",
            f":{self.http_port}" if self.http is not None else "off",
            self.settings.model_dir,
            self.engine.provider,
            f", health :{self.health_port} (plaintext)" if self.health_server is not None else "",
        )

    async def drain(self) -> bool:
        """Stop taking work, let in-flight requests finish within the grace period, stop. True if all finished."""
        started = time.monotonic()
        deadline = started + self.settings.drain_grace_s
        self.dataplane.ready = False  # new requests: UNAVAILABLE; ServerReady: false
        await self.health.enter_graceful_shutdown()
        inflight = self.dataplane.inflight
        if self.http is not None:
            self.http.close()  # no new connections; open ones close after their request in flight
        # GOAWAY once the unary answers in flight are written, not at once: after GOAWAY, gRPC shuts a connection
        # down the moment its last call ends, and a client still reading a big answer then sends a window update
        # into a closed socket, which resets the connection and drops the answer's unsent tail (a plain grpcio
        # server lost a 16 MiB answer in 7 of 140 drains so, 0 of 120 this way). Sent after the answers, GOAWAY's
        # ping reaches the client behind them: gRPC closes only once the client has read them all. Meanwhile new
        # calls get UNAVAILABLE.
        answered = await self._answers_written(deadline)
        stopping = asyncio.create_task(self.server.stop(grace=self._left(deadline)))
        finished = await self.dataplane.wait_idle(self._left(deadline)) and answered
        log.info(
            "drain: %d in flight at SIGTERM, %s after %.2f s",
            inflight,
            "all finished" if finished else "grace period over",
            time.monotonic() - started,
        )
        await stopping
        await self._release()
        return finished

    async def _answers_written(self, deadline: float) -> bool:
        """Wait until gRPC has written the answers of the unary calls in progress; False if the deadline came."""
        pending = self.gate.unanswered()
        if not pending:
            return True
        _, unanswered = await asyncio.wait(pending, timeout=self._left(deadline))
        return not unanswered

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)  # answers already computed still go out
        await self._release()

    async def _release(self) -> None:
        """Everything but the gRPC server, once it has stopped."""
        if self.http is not None:
            await self.http.stop(grace_s=1.0)  # after drain's wait: what is left is answers being written
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        await asyncio.to_thread(self.batcher.close)
        self.metrics.close()
        if self._flusher is not None:
            self._flusher.cancel()
        if self.access_log is not None:
            self.access_log.flush()
        if self.tracing is not None:  # export the spans still queued, off the loop (it waits for the collector)
            await asyncio.to_thread(self.tracing.shutdown)
