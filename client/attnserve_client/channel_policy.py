"""How a client spreads calls over replicas and rides out one going away: a gRPC service config.

Kubernetes scales attnserve by replicas; a client that resolves all of them (a headless Service, `dns:///…`, or
`ipv4:a:p,b:p`) balances round robin per call, not per connection, so one busy replica does not take a whole
client's load. A replica that dies (connection reset) or drains (our UNAVAILABLE during SIGTERM) fails the call
before any answer was sent: retried on another replica, transparently. Attention has no side effects, so every
method may be retried; only UNAVAILABLE is, because every other error would repeat on any replica."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from attnserve_client._pb.attnserve.v1 import attention_pb2

# The services this client calls, as its generated protos name them (it has stubs for no other).
SERVICES = tuple(service.full_name for service in attention_pb2.DESCRIPTOR.services_by_name.values())
RETRY_CODES = ("UNAVAILABLE",)


def service_config(max_attempts: int = 5, initial_backoff_s: float = 0.05, max_backoff_s: float = 1.0) -> str:
    """The JSON service config: round_robin, and retries of UNAVAILABLE with exponential backoff."""
    retry = {
        "maxAttempts": max_attempts,  # gRPC caps it at 5
        "initialBackoff": f"{initial_backoff_s:g}s",
        "maxBackoff": f"{max_backoff_s:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRY_CODES),
    }
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [{"name": [{"service": name} for name in SERVICES], "retryPolicy": retry}],
        }
    )


def balanced_options(max_attempts: int = 5) -> list[tuple[str, Any]]:
    """Channel options that apply service_config (a service config from DNS would otherwise win; ours is the
    one we test)."""
    return [
        ("grpc.service_config", service_config(max_attempts)),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
    ]


def replicas_target(addresses: Sequence[str]) -> str:
    """One gRPC target naming every replica (host:port each, IPv4): `ipv4:127.0.0.1:8001,127.0.0.1:8011`."""
    if not addresses:
        raise ValueError("replicas_target: give at least one host:port")
    return "ipv4:" + ",".join(addresses)
