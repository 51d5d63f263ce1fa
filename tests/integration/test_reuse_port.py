"""--reuse-port: several service processes on one gRPC port (SO_REUSEPORT), the kernel spreading connections;
without it a taken port is an error at start, never a silent share."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from attnserve_client._pb.attnserve.v1.attention_pb2_grpc import AttentionServiceStub
from attnserve_client.client import attend_request
from tests.server_process import ServerProcess, free_port, start_server

CONNECTIONS = 32  # each lands on one process; all 32 on the same one: 2^-31


def test_two_processes_share_a_port_only_when_asked(served_model: Path) -> None:
    port = str(free_port())
    flags = ("--grpc-port", port, "--warmup", "false", "--engine-workers", "1", "--intra-op-threads", "1")
    first = start_server(served_model, *flags, "--reuse-port", "true")
    second: ServerProcess | None = None
    try:
        with pytest.raises(RuntimeError):  # the port is taken and this one did not ask to share
            start_server(served_model, *flags, timeout_s=60)
        second = start_server(served_model, *flags, "--reuse-port", "true")
        request = attend_request(np.zeros((1, 4, 512), np.float32))
        for _ in range(CONNECTIONS):
            # A local subchannel pool: a fresh connection per channel, not one from gRPC's shared pool.
            with grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)]) as channel:
                AttentionServiceStub(channel).Attend(request, timeout=30)
        served = [s.metric("attnserve_requests_total", code="OK") for s in (first, second)]
        assert sum(served) == CONNECTIONS and min(served) > 0, served
    finally:
        for server in (first, second):
            if server is not None:
                assert server.stop() == 0
