"""--max-connection-age-s: the server closes a client's connection after that long (GOAWAY), so a client behind a
Kubernetes Service reconnects and may reach a replica added since; calls keep working across it."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np

from attnserve_client._pb.attnserve.v1.attention_pb2_grpc import AttentionServiceStub
from attnserve_client.client import attend_request
from tests.server_process import start_server

AGE_S = 1.0


def _idle_after_calls(address: str, wait_s: float) -> bool:
    """One call, wait, then: has the connection gone idle (closed by the server), and does a call still work?"""
    request = attend_request(np.zeros((1, 4, 512), np.float32))
    with grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = AttentionServiceStub(channel)
        stub.Attend(request, timeout=30)
        time.sleep(wait_s)
        state: list[grpc.ChannelConnectivity] = []
        channel.subscribe(state.append, try_to_connect=False)
        time.sleep(0.2)
        idle = state[-1] == grpc.ChannelConnectivity.IDLE
        stub.Attend(request, timeout=30)  # reconnects
        return idle


def test_connections_are_closed_after_their_age_and_calls_go_on(served_model: Path) -> None:
    aged = start_server(served_model, "--max-connection-age-s", str(AGE_S), "--warmup", "false")
    forever = start_server(served_model, "--warmup", "false")
    try:
        # gRPC adds up to ±10% jitter to the age, plus the grace for calls in flight (none here).
        assert _idle_after_calls(aged.address, 2.5 * AGE_S)
        assert not _idle_after_calls(forever.address, 2.5 * AGE_S)
    finally:
        assert aged.stop() == 0 and forever.stop() == 0
