"""Replicas and failover on loopback: what Kubernetes gives at scale, with our side of it proved.

Three service processes; one client whose channel names all three (attnserve_client/channel_policy.py: round robin per
call, UNAVAILABLE retried). Under steady load one replica is SIGKILLed, then another SIGTERMed: every call is
answered, at least 99.9% of them OK; the killed replica's share goes to the others; the SIGTERMed one drains
(exit 0) while the client moves on."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from attnserve_client import AsyncAttentionClient, replicas_target
from bench.harness.servers import start_in_parallel
from tests.server_process import ServerProcess, start_server

# Small requests, one engine thread each: three replicas share this machine's cores.
FLAGS = ("--engine-workers", "1", "--intra-op-threads", "1", "--drain-grace-s", "10", "--warmup", "false")
CALLERS = 6
PHASE_S = 3.0  # all three up | after the SIGKILL | after the SIGTERM
SEQ = 16
MIN_SUCCESS = 0.999


@pytest.fixture
def replicas(served_model: Path) -> Iterator[list[ServerProcess]]:
    started = start_in_parallel(
        ["a", "b", "c"], lambda _: start_server(served_model, *FLAGS), lambda server: server.stop()
    )
    servers = list(started.values())
    yield servers
    for server in servers:
        if server.process.poll() is None:
            server.stop()


def _served(server: ServerProcess) -> float:
    return server.metric("attnserve_requests_total", code="OK")


@dataclass
class Outcomes:
    """Each answered call: when it ended and its status code."""

    sent: int = 0
    ended: list[tuple[float, grpc.StatusCode]] = field(default_factory=list)

    def codes(self, start: float = 0.0, end: float = float("inf")) -> Counter:
        return Counter(code for at, code in self.ended if start <= at < end)


async def _load(target: str, until: float, outcomes: Outcomes) -> None:
    x = np.random.default_rng(0).standard_normal((1, SEQ, 512), dtype=np.float32)
    async with AsyncAttentionClient(target, timeout_s=30.0) as client:

        async def caller() -> None:
            while time.monotonic() < until:
                outcomes.sent += 1
                try:
                    await client.attend(x)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                outcomes.ended.append((time.monotonic(), code))

        await asyncio.gather(*(caller() for _ in range(CALLERS)))


def test_a_killed_and_a_drained_replica_cost_no_requests(replicas: list[ServerProcess]) -> None:
    killed, drained, survivor = replicas
    target = replicas_target([server.address for server in replicas])
    outcomes = Outcomes()
    marks: dict[str, float] = {}
    served: dict[str, list[float]] = {}

    async def scenario() -> None:
        marks["start"] = time.monotonic()
        load = asyncio.create_task(_load(target, marks["start"] + 3 * PHASE_S, outcomes))
        await asyncio.sleep(PHASE_S)
        served["before"] = [_served(server) for server in replicas]
        marks["kill"] = time.monotonic()
        killed.process.kill()
        await asyncio.sleep(PHASE_S)
        served["killed"] = [_served(drained), _served(survivor)]
        marks["term"] = time.monotonic()
        drained.process.terminate()  # SIGTERM: NOT_SERVING, new calls UNAVAILABLE, in-flight ones finish
        await load
        marks["end"] = time.monotonic()
        served["end"] = [_served(survivor)]

    asyncio.run(scenario())
    drain_code = drained.process.wait(30)

    codes = outcomes.codes()
    answered = sum(codes.values())
    assert outcomes.sent == answered, f"{outcomes.sent - answered} calls left without an answer"
    assert codes[grpc.StatusCode.OK] >= MIN_SUCCESS * answered, codes
    assert drain_code == 0, drained.log()[-2000:]
    assert "drain:" in drained.log()

    # Round robin: each replica served its part while all three were up.
    assert all(n > 0 for n in served["before"]), served
    # After the SIGKILL the other two took the killed one's share: each served at a higher rate than before.
    rate_before = [n / (marks["kill"] - marks["start"]) for n in served["before"][1:]]
    rate_after = [
        (now - then) / (marks["term"] - marks["kill"])
        for now, then in zip(served["killed"], served["before"][1:], strict=True)
    ]
    assert all(after > before for after, before in zip(rate_after, rate_before, strict=True)), (rate_before, rate_after)
    # After the SIGTERM only the survivor answers: its count grew by what the client got in that phase.
    ok_last = outcomes.codes(marks["term"], marks["end"] + 1)[grpc.StatusCode.OK]
    survivor_last = served["end"][0] - served["killed"][1]
    assert survivor_last >= 0.9 * ok_last, (survivor_last, ok_last)
