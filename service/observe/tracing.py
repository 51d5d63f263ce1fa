"""OpenTelemetry tracing: the one module of the service that imports OpenTelemetry, and only when tracing is on
(service/observe/trace_config.py decides; the rest of the service sees `Tracing`'s few methods and opaque spans).

What a traced request leaves:
- a SERVER span per request (`inference.GRPCInferenceService/ModelInfer`), child of the caller's W3C `traceparent`
  when it sent one, with the rpc semantic conventions (rpc.system, rpc.service, rpc.method, rpc.grpc.status_code)
  and ours (api, model, seq_bucket, seq_len, batch_size, graph, request id);
- under it `attnserve.queue` (its wait for an engine thread; none when it computed at once) and `attnserve.compute`
  (its engine run, from the hand-over to an engine thread to the answer back on the event loop);
- per engine run of several requests (batching), one `attnserve.run` span in a trace of its own, linked to every
  traced request it served, and each request's compute span linked back to it; a run of one request is described
  by that request's compute span (the run's attributes on it), one span fewer per request.

Cost: every span is made on the event loop, the run's and its members' children after the fact with explicit
timestamps from the times the batcher measured anyway (nothing runs on the engine threads). Finished spans go to a
BatchSpanProcessor: a bounded queue a thread of its own exports from, so a slow or absent collector drops spans and
never blocks a request or grows memory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.core.types import AttentionRequest, AttentionResult
from service.observe.trace_config import TraceConfig

DEFAULT_SERVICE_NAME = "attnserve"
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# The gRPC semantic conventions: these codes mark a server span as an error; the rest are the client's doing.
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}
DEFAULT_EXPORT_BATCH = 512  # BatchSpanProcessor's spans per export, unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE says

# The HTTP edge's traced operations (service/api/http_server.py) and their routes, as span names and http.route.
HTTP_ROUTES = {"infer": "/v2/models/{model_name}/infer"}

# Request headers as an edge has them: gRPC's invocation_metadata (a callable, read only when tracing is on), or an
# HTTP edge's header mapping.
Headers = Callable[[], Iterable[tuple[str, str | bytes]] | None] | Mapping[str, str] | None


class Member(Protocol):
    """A request as an engine run saw it (service/engine/batching.py Waiting)."""

    request: AttentionRequest
    enqueued: float  # time.perf_counter() when it was queued


def trace_context(headers: Headers) -> Context | None:
    """The caller's W3C trace context (traceparent, tracestate) from request headers; None without a valid one.
    The HTTP edge passes its header mapping (any case of the names), the gRPC edge its metadata."""
    if headers is None:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else (headers() or ())
    carrier = {}
    for key, value in pairs:
        name = key.lower()
        if name in TRACE_HEADERS and isinstance(value, str):
            carrier[name] = value
    if "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The service's tracer provider and the spans it makes; `shutdown` exports what is left."""

    def __init__(self, config: TraceConfig, version: str, model: str, rpc_services: Mapping[str, str]) -> None:
        """rpc_services: api label (kserve, v1) -> the gRPC service's full name (rpc.service)."""
        self.config = config
        self.model = model
        self.rpc_services = dict(rpc_services)
        resource = Resource.create({SERVICE_VERSION: version})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # neither OTEL_ var named it
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        self.service_name = str(resource.attributes[SERVICE_NAME])
        processors = SynchronousMultiSpanProcessor()
        for name in config.exporters:
            processors.add_span_processor(_batch_processor(_exporter(name, config), config))
        self._provider = TracerProvider(
            sampler=_sampler(config), resource=resource, active_span_processor=processors, shutdown_on_exit=True
        )
        self._tracer = self._provider.get_tracer("attnserve", version)
        # A run and a request's queue and compute spans are made only for requests already sampled, so they follow
        # them: a tracer of their own that samples all, sharing the processors (a run is a new trace's root, which
        # a ratio sampler would otherwise decide on afresh).
        self._follower = TracerProvider(
            sampler=sampling.ALWAYS_ON, resource=resource, active_span_processor=processors, shutdown_on_exit=False
        ).get_tracer("attnserve", version)

    def describe(self) -> str:
        return f"{self.config.describe()}; service.name {self.service_name}"

    # --- per request, on the event loop -------------------------------------------------------------------------

    def start(self, api: str, method: str, headers: Headers, protocol: str) -> Span:
        """A request's server span, child of the caller's trace when its headers carry one."""
        service = self.rpc_services.get(api, api)
        attributes: dict[str, str | int] = {"attnserve.api": api, "attnserve.model": self.model}
        if protocol == "grpc":
            attributes.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
            name = f"{service}/{method}"
        else:  # HTTP's conventions: "{method} {route}", the route a template, never the client's path
            route = HTTP_ROUTES.get(method, method)
            attributes.update({"http.request.method": "POST", "http.route": route})
            name = f"POST {route}"
        return self._tracer.start_span(
            name, context=trace_context(headers), kind=SpanKind.SERVER, attributes=attributes
        )

    def finish(
        self, span: Span, protocol: str, code: str, request: AttentionRequest | None, result: AttentionResult | None,
        request_id: str, bucket: str,
    ) -> str:  # fmt: skip
        """End a request's span with what became of it (bucket: its seq_bucket label); its trace id (32 hex digits)
        if sampled, else ""."""
        if not span.is_recording():
            span.end()
            return ""
        attributes: dict[str, str | int] = {"attnserve.code": code, "attnserve.request_id": request_id}
        if protocol == "grpc" and code in GRPC_CODES:
            attributes["rpc.grpc.status_code"] = GRPC_CODES[code]
        if request is not None:
            attributes["attnserve.seq_len"] = request.seq_len
            attributes["attnserve.seq_bucket"] = bucket
            attributes["attnserve.batch_size"] = request.batch_size
        if result is not None:
            attributes["attnserve.graph"] = result.graph
        span.set_attributes(attributes)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()
        return format(span.get_span_context().trace_id, "032x")

    # --- per engine run, on the event loop once it is done --------------------------------------------------------

    def record_run(
        self, members: Sequence[Member], started: float, provider: str, graph: str, rows: int, longest: int,
        padded_tokens: int, compute_s: float,
    ) -> None:  # fmt: skip
        """A finished run's spans: each traced member's queue and compute spans, and for a run of several requests
        its own span, linked to each traced member and linked back from their compute spans. A run of one request
        is its compute span alone (a run span would repeat it, at a third of a traced request's cost).
        started: time.perf_counter() when the run went to an engine thread (or computed at once); it ends now."""
        traced = [(m, m.request.trace) for m in members if isinstance(m.request.trace, Span)]
        traced = [(m, span) for m, span in traced if span.is_recording()]
        if not traced:
            return
        now_ns, now = time.time_ns(), time.perf_counter()

        def ns(t: float) -> int:  # perf_counter -> the spans' wall clock, anchored now (no drift across a run)
            return now_ns - int((now - t) * 1e9)

        begun = ns(started)
        run_attributes: dict[str, str | int] = {
            "attnserve.provider": provider, "attnserve.graph": graph, "attnserve.rows": rows,
            "attnserve.longest": longest, "attnserve.padded_tokens": padded_tokens,
            "attnserve.requests": len(members), "attnserve.compute_us": round(compute_s * 1e6),
        }  # fmt: skip
        run: Span | None = None
        if len(members) > 1:
            run = self._follower.start_span(
                "attnserve.run",
                context=Context(),  # a root of its own, whatever context is current
                links=[Link(span.get_span_context()) for _, span in traced],
                start_time=begun,
                attributes=run_attributes,
            )
        to_run = [Link(run.get_span_context())] if run is not None else None
        for member, span in traced:
            parent = set_span_in_context(span)
            if member.enqueued < started:  # a request computed at once never waited
                self._follower.start_span("attnserve.queue", parent, start_time=ns(member.enqueued)).end(begun)
            attributes = {"attnserve.graph": graph} if run is not None else run_attributes
            self._follower.start_span(
                "attnserve.compute", parent, links=to_run, start_time=begun, attributes=attributes
            ).end(now_ns)
        if run is not None:
            run.end(now_ns)

    def shutdown(self) -> None:
        """Export what is queued (within the exporters' timeouts) and stop; blocking: call it off the event loop."""
        self._provider.shutdown()


def _sampler(config: TraceConfig) -> sampling.Sampler:
    root: sampling.Sampler = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(config.ratio),
    }[config.sampler.removeprefix("parentbased_")]
    return sampling.ParentBased(root) if config.sampler.startswith("parentbased_") else root


def _exporter(name: str, config: TraceConfig) -> SpanExporter:
    """Headers, TLS, compression and timeout come from the OTEL_EXPORTER_OTLP_* variables, read by the exporter."""
    if name == "console":
        return ConsoleSpanExporter(out=sys.stderr)  # stdout is the access log
    if config.protocol == "grpc":
        return GrpcSpanExporter(endpoint=config.endpoint)
    return HttpSpanExporter(endpoint=config.endpoint)


def _batch_processor(exporter: SpanExporter, config: TraceConfig) -> SpanProcessor:
    # An export batch larger than the queue is an error to the SDK: a small queue makes small batches.
    batch = config.max_queue_spans if config.max_queue_spans < DEFAULT_EXPORT_BATCH else None
    return BatchSpanProcessor(
        exporter,
        max_queue_size=config.max_queue_spans,
        schedule_delay_millis=config.schedule_delay_ms,
        max_export_batch_size=batch,
    )
