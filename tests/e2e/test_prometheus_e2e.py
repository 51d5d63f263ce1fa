"""End to end with a real Prometheus: the service under mixed traffic, scraped every second, and every
recording rule and every dashboard query answered with data; latency grows with the sequence bucket; an
exemplar on the slowest bucket leads to a request in the access log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._pb.attnserve.v1 import attention_pb2 as v1
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service.api.v1_codec import tensor_to_pb
from tests.grafana_queries import concrete, panel_queries, variable_queries
from tests.load.loadgen import LoadConfig, LoadResult, run_load_async
from tests.load.workload import LengthMix, build_target
from tests.prometheus_process import PrometheusProcess, start_prometheus
from tests.server_process import ServerProcess, start_server

MIX = LengthMix.parse("16:6,64:3,256:2,1024:1,2048:1")  # every default bucket from ≤16 to ≤4096
SHORTEST, LONGEST = "16", "4096"
RATE_WINDOW = "30s"  # what $__rate_interval becomes: several 1 s scrapes, all inside the test's traffic


@pytest.fixture(scope="module")
def scraped(
    served_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, PrometheusProcess]]:
    server = start_server(served_model, "--access-log", "all")
    try:
        workdir = tmp_path_factory.mktemp("prometheus")
        with start_prometheus([f"127.0.0.1:{server.metrics_port}"], workdir) as prometheus:
            prometheus.wait_for('up{job="attnserve"} == 1', timeout_s=30)
            results = asyncio.run(_traffic(server.address))
            assert all(r.count > 0 for r in results[:2]), [r.table() for r in results]
            time.sleep(3.0)  # the last answers scraped, the rules evaluated (both every 1 s)
            yield server, prometheus
    finally:
        server.stop()


async def _traffic(address: str) -> list[LoadResult]:
    """Mixed lengths on both APIs (one over streams), a few bad requests, and deadlines too short to meet."""
    ok = LoadConfig(concurrency=3, warmup_requests=0, duration_s=6.0, max_requests=2000, timeout_s=60.0)
    stream = LoadConfig(concurrency=1, warmup_requests=0, duration_s=6.0, max_requests=2000, stream=True)
    hurried = LoadConfig(concurrency=4, warmup_requests=0, duration_s=2.0, max_requests=40, timeout_s=0.02)
    return await asyncio.gather(
        run_load_async(address, build_target("kserve", MIX, pool=32), ok),
        run_load_async(address, build_target("v1", MIX, pool=32, seed=1), stream),
        run_load_async(address, build_target("v1", LengthMix.fixed(1024)), hurried),
        _bad_requests(address),
    )  # type: ignore[return-value]


async def _bad_requests(address: str) -> None:
    wrong_width = v1.AttendRequest(hidden_states=tensor_to_pb(np.zeros((1, 8, 7), np.float32)))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = v1_grpc.AttentionServiceStub(channel)
        for request in (wrong_width, v1.AttendRequest()):
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Attend(request, timeout=10)


def _has_data(result: list[dict]) -> bool:
    return any(r["value"][1] not in ("NaN",) for r in result)


def test_every_recording_rule_is_healthy_and_returns_data(scraped: tuple[ServerProcess, PrometheusProcess]) -> None:
    _, prometheus = scraped
    rules = [rule for group in prometheus.rules() for rule in group["rules"] if rule["type"] == "recording"]
    assert len(rules) >= 10
    empty = []
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        if not _has_data(prometheus.query(rule["query"])) or not prometheus.query(rule["name"]):
            empty.append(rule["name"])
    assert not empty, f"recording rules without data: {empty}"


def test_every_dashboard_query_returns_data(scraped: tuple[ServerProcess, PrometheusProcess]) -> None:
    _, prometheus = scraped
    queries = panel_queries()
    assert len(queries) >= 15
    empty = [
        f"{q.panel} [{q.ref_id}]: {q.expr}"
        for q in queries
        if not _has_data(prometheus.query(concrete(q.expr, rate_interval=RATE_WINDOW, range_="2m")))
    ]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    for variable in variable_queries():
        assert prometheus.query(variable.expr), variable


def test_p99_grows_from_the_shortest_bucket_to_the_longest(scraped: tuple[ServerProcess, PrometheusProcess]) -> None:
    _, prometheus = scraped
    p99 = {
        r["metric"]["seq_bucket"]: float(r["value"][1])
        for r in prometheus.query(
            "histogram_quantile(0.99, sum by (le, seq_bucket) "
            f'(rate(attnserve_request_duration_seconds_bucket{{code="OK"}}[{RATE_WINDOW}])))'
        )
    }
    assert {SHORTEST, LONGEST} <= set(p99), p99
    assert p99[LONGEST] > p99[SHORTEST], p99


def test_an_exemplar_of_the_slowest_bucket_leads_to_its_access_log_line(
    scraped: tuple[ServerProcess, PrometheusProcess],
) -> None:
    server, prometheus = scraped
    series = prometheus.exemplars(f'attnserve_request_duration_seconds_bucket{{seq_bucket="{LONGEST}"}}')
    ids = {e["labels"]["request_id"] for s in series for e in s["exemplars"]}
    assert ids, series
    logged = {line["request_id"]: line for line in map(json.loads, list(server.access_lines))}
    found = [logged[i] for i in ids if i in logged]
    assert found, f"exemplar ids {sorted(ids)[:5]} not in the access log"
    assert all(line["seq"] > 1024 and line["code"] == "OK" for line in found), found


def test_the_access_log_is_one_json_object_per_request(scraped: tuple[ServerProcess, PrometheusProcess]) -> None:
    server, _ = scraped
    lines = [json.loads(line) for line in list(server.access_lines)]
    codes = {line["code"] for line in lines}
    assert {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED"} <= codes, codes
    ok = next(line for line in lines if line["code"] == "OK")
    assert ok["total_us"] >= ok["compute_us"] > 0 and ok["graph"] and ok["batch"] == 1
    assert set(ok) == {"ts", "request_id", "api", "method", "code", "seq", "batch", "graph", "queue_us",
                       "compute_us", "total_us"}  # fmt: skip
