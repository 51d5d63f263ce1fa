"""Tracing's configuration from the OTEL_* variables: off unless configured, as OpenTelemetry's operators expect;
what we cannot honour stops the server at start."""

from __future__ import annotations

import pytest

from service.core.errors import SettingsError
from service.observe.trace_config import TraceConfig

ENDPOINT = "http://collector:4318"


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),  # nothing says where to send
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),  # to the default endpoint
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
    ],
)
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_configured(env: dict[str, str], on: bool) -> None:
    config = TraceConfig.from_env(env)
    assert config.enabled is on
    assert config.describe().startswith("on (" if on else "off (")


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT + "/"}, ENDPOINT + "/v1/traces"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x"},
            "http://t:1/x",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http://c:4317"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "http://localhost:4318/v1/traces"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "http://localhost:4317"),
    ],
)
def test_the_endpoint_follows_the_specification(env: dict[str, str], endpoint: str) -> None:
    assert TraceConfig.from_env(env).endpoint == endpoint


def test_sampler_protocol_and_queue_as_configured() -> None:
    config = TraceConfig.from_env(
        {
            "OTEL_TRACES_EXPORTER": "otlp,console",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",  # the traces-specific one wins
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        }
    )
    assert (config.exporters, config.protocol, config.sampler, config.ratio) == (
        ("otlp", "console"), "grpc", "parentbased_traceidratio", 0.25,
    )  # fmt: skip
    assert config.max_queue_spans == 100
    assert "sampler parentbased_traceidratio 0.25" in config.describe() and "console" in config.describe()


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "jaeger"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "xray"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "0"},
    ],
)
def test_what_cannot_be_honoured_stops_the_server(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        TraceConfig.from_env(env)
