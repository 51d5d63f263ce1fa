"""Whether and how to trace, from the standard OTEL_* environment variables, without importing OpenTelemetry.

Tracing is off unless an operator asks for it, the way OpenTelemetry's other servers read it:
- OTEL_SDK_DISABLED=true turns it off, whatever else is set;
- OTEL_TRACES_EXPORTER (a comma-separated list of otlp, console; none = no exporter) turns it on;
- without OTEL_TRACES_EXPORTER, an OTLP endpoint (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT)
  turns it on with the OTLP exporter. Nothing set: off (the SDK's own default would export to localhost and fail).

With tracing off, service/observe/tracing.py (the one module that imports OpenTelemetry) is never imported. A value
we cannot honour (an unknown exporter, sampler or protocol, a ratio that is not a number in [0, 1]) stops the server
at start with a SettingsError, rather than a server that silently traces differently from what was asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.core.errors import SettingsError

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")  # http/json: the Python SDK ships no exporter for it
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DEFAULT_SAMPLER = "parentbased_always_on"  # the specification's default
DEFAULT_PROTOCOL = "http/protobuf"  # the specification's default
DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}
HTTP_TRACES_PATH = "/v1/traces"
# BatchSpanProcessor's bounds (the specification's defaults): spans past the queue are dropped, never held.
DEFAULT_MAX_QUEUE_SPANS = 2048
DEFAULT_SCHEDULE_DELAY_MS = 5000


@dataclass(frozen=True)
class TraceConfig:
    enabled: bool
    why: str  # what turned it on or off, for the start-up log
    exporters: tuple[str, ...] = ()
    protocol: str = DEFAULT_PROTOCOL
    endpoint: str = ""  # where OTLP spans go, as the exporter is given it
    sampler: str = DEFAULT_SAMPLER
    ratio: float = 1.0  # traceidratio samplers' OTEL_TRACES_SAMPLER_ARG
    max_queue_spans: int = DEFAULT_MAX_QUEUE_SPANS
    schedule_delay_ms: int = DEFAULT_SCHEDULE_DELAY_MS

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TraceConfig:
        """The tracing configuration the OTEL_* variables in environ ask for; SettingsError for one we cannot honour."""

        def get(name: str) -> str:
            return environ.get(name, "").strip()

        if get("OTEL_SDK_DISABLED").lower() == "true":
            return cls(False, "OTEL_SDK_DISABLED=true")
        endpoint_var = next(
            (v for v in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT") if get(v)), None
        )
        if named := get("OTEL_TRACES_EXPORTER"):
            exporters = tuple(dict.fromkeys(e.strip().lower() for e in named.split(",") if e.strip()))
            unknown = [e for e in exporters if e not in (*EXPORTERS, "none")]
            if unknown:
                raise SettingsError(
                    f"OTEL_TRACES_EXPORTER={named!r}: unsupported {', '.join(unknown)}; use otlp, console or none"
                )
            exporters = tuple(e for e in exporters if e != "none")
            if not exporters:
                return cls(False, f"OTEL_TRACES_EXPORTER={named}")
            why = f"OTEL_TRACES_EXPORTER={named}"
        elif endpoint_var is not None:
            exporters, why = ("otlp",), f"{endpoint_var} set"
        else:
            return cls(False, "no OTEL_TRACES_EXPORTER or OTLP endpoint set")
        protocol = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or get("OTEL_EXPORTER_OTLP_PROTOCOL") or DEFAULT_PROTOCOL
        if protocol not in PROTOCOLS:
            raise SettingsError(f"OTLP protocol {protocol!r}: unsupported; use {' or '.join(PROTOCOLS)}")
        sampler = get("OTEL_TRACES_SAMPLER").lower() or DEFAULT_SAMPLER
        if sampler not in SAMPLERS:
            raise SettingsError(f"OTEL_TRACES_SAMPLER={sampler!r}: unsupported; use one of {', '.join(SAMPLERS)}")
        return cls(
            True,
            why,
            exporters,
            protocol,
            _endpoint(get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), get("OTEL_EXPORTER_OTLP_ENDPOINT"), protocol),
            sampler,
            _ratio(get("OTEL_TRACES_SAMPLER_ARG")) if sampler.endswith("traceidratio") else 1.0,
            _positive(environ, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SPANS),
            _positive(environ, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS),
        )

    def describe(self) -> str:
        """The effective configuration in one line, for the start-up log."""
        if not self.enabled:
            return f"off ({self.why})"
        sinks = [f"otlp {self.protocol} -> {self.endpoint}" if e == "otlp" else e for e in self.exporters]
        sampler = f"{self.sampler} {self.ratio:g}" if self.sampler.endswith("traceidratio") else self.sampler
        return (
            f"on ({self.why}): {', '.join(sinks)}; sampler {sampler}; W3C traceparent/tracestate from request "
            f"headers; spans exported in batches every {self.schedule_delay_ms} ms, at most "
            f"{self.max_queue_spans} waiting (more are dropped)"
        )


def _endpoint(traces: str, generic: str, protocol: str) -> str:
    """The specification's rule: the traces endpoint as given; the generic one with /v1/traces added for OTLP/HTTP."""
    if traces:
        return traces
    base = generic or DEFAULT_ENDPOINTS[protocol]
    return base.rstrip("/") + HTTP_TRACES_PATH if protocol == "http/protobuf" else base


def _ratio(text: str) -> float:
    if not text:
        return 1.0
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise SettingsError(f"OTEL_TRACES_SAMPLER_ARG={text!r}: the sampling ratio must be a number in [0, 1]")
    return ratio


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise SettingsError(f"{name}={text!r}: must be a positive whole number")
    return int(text)
