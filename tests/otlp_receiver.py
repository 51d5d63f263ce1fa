"""Real OTLP trace receivers on loopback, as an OpenTelemetry Collector receives: OTLP/HTTP (POST /v1/traces, a
protobuf `ExportTraceServiceRequest`, gzip or not) and OTLP/gRPC (TraceService/Export), decoded with
opentelemetry-proto. Tests read the spans they got; `python -m tests.otlp_receiver` is a sink that only counts
them, in a process of its own (make bench-metrics: its decoding takes no CPU from the load client's process).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, ids as hex."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    kind: int  # opentelemetry.proto.trace.v1 Span.SpanKind: 2 = SERVER, 1 = INTERNAL
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, object]


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "int_value", "double_value", "bool_value") else None


def _spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                attributes = {a.key: _value(a.value) for a in s.attributes}
                links = tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links)
                ids = (s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex())
                times = (s.start_time_unix_nano, s.end_time_unix_nano)
                out.append(ReceivedSpan(s.name, *ids, s.kind, *times, attributes, links, s.status.code, resource))
    return out


@dataclass
class Received:
    """What a receiver got, shared with its serving threads."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0
    keep: bool = True  # False: count only (the bench's sink)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: bytes) -> None:
        """One export's serialized ExportTraceServiceRequest; a sink that keeps nothing does not even decode it."""
        spans = _spans(trace_service_pb2.ExportTraceServiceRequest.FromString(body)) if self.keep else []
        with self.lock:
            self.exports += 1
            self.spans.extend(spans)

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """Poll until done(spans) holds; the spans. AssertionError with what arrived on timeout."""
        deadline = time.monotonic() + timeout_s
        while not done(spans := self.snapshot()):
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise AssertionError(f"spans not received in {timeout_s:g} s; got {len(spans)}: {names}")
            time.sleep(0.02)
        return spans


class OtlpHttpReceiver:
    """OTLP/HTTP on 127.0.0.1, a free port; `endpoint` is what OTEL_EXPORTER_OTLP_TRACES_ENDPOINT takes."""

    def __init__(self, keep: bool = True) -> None:
        self.received = Received(keep=keep)
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != TRACES_PATH:
                    self.send_error(404)
                    return
                received.add(body)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OtlpGrpcReceiver:
    """OTLP/gRPC (opentelemetry.proto.collector.trace.v1.TraceService/Export) on 127.0.0.1, a free port."""

    def __init__(self, keep: bool = True) -> None:
        self.received = Received(keep=keep)
        received = self.received

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                received.add(request.SerializeToString())
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.stop(grace=None)


def main(argv: list[str] | None = None) -> int:
    """A sink: receive OTLP/HTTP until stdin closes, printing `port N` first and `exports N` at the end."""
    parser = argparse.ArgumentParser(prog="python -m tests.otlp_receiver", description=main.__doc__)
    parser.parse_args(argv)
    receiver = OtlpHttpReceiver(keep=False)
    print(f"port {receiver.port}", flush=True)
    sys.stdin.read()  # until the parent closes it (or exits)
    receiver.close()
    print(f"exports {receiver.received.exports}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
