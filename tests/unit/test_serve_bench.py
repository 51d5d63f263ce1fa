"""Smoke test of `make bench-serve`'s parts: the echo and baseline servers answer, and the load client returns
sane numbers against the real service. No timing assertions: this machine is shared."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.servers import start_bench_server, stop_bench_server
from tests.load.loadgen import LoadConfig, LoadResult, run_load
from tests.load.workload import Shape, kserve_target, v1_target
from tests.server_process import ServerProcess

SHAPE = Shape(1, 16, 512)
TINY = LoadConfig(concurrency=2, warmup_requests=2, max_requests=20, duration_s=20.0, timeout_s=20.0)


def _sane(result: LoadResult, count: int) -> None:
    assert result.errors == {}
    assert result.count == count
    assert result.tokens == count * SHAPE.tokens
    assert result.elapsed_s > 0 and result.throughput_rps > 0 and result.tokens_per_s > 0
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert len(result.latencies_ms) == count
    data = json.loads(json.dumps(result.to_dict()))
    assert data["count"] == count and "latencies_ms" not in data


@pytest.fixture(scope="module")
def bench_servers(served_model: Path) -> Iterator[dict[str, str]]:
    started = {name: start_bench_server(f"{name}_server", served_model) for name in ("echo", "baseline")}
    yield {name: f"127.0.0.1:{port}" for name, (_, port) in started.items()}
    for process, _ in started.values():
        stop_bench_server(process)


@pytest.mark.parametrize("api", ["kserve", "v1"])
def test_load_client_against_the_service(server: ServerProcess, api: str) -> None:
    target = kserve_target(SHAPE) if api == "kserve" else v1_target(SHAPE)
    _sane(run_load(server.address, target, TINY), 20)


def test_echo_server_answers_the_request_bytes(bench_servers: dict[str, str]) -> None:
    # Unchecked: the echo's answer is the request itself, not a ModelInferResponse.
    _sane(run_load(bench_servers["echo"], kserve_target(SHAPE).without_check(), TINY), 20)


def test_baseline_server_answers_model_infer(bench_servers: dict[str, str]) -> None:
    # Checked: the first answer is parsed, and its output shape and byte count must match.
    _sane(run_load(bench_servers["baseline"], kserve_target(SHAPE), TINY), 20)


def test_a_wrong_answer_is_an_error(bench_servers: dict[str, str]) -> None:
    """The echo returns the request, not a ModelInferResponse with the output: a checked run reports it."""
    config = LoadConfig(concurrency=1, warmup_requests=1, max_requests=3, duration_s=10.0)
    result = run_load(bench_servers["echo"], kserve_target(SHAPE), config)
    assert result.errors == {"BAD_RESPONSE": 1}


def test_a_refused_request_is_counted_by_its_code(server: ServerProcess) -> None:
    """d_model 8 is not this model's 512: INVALID_ARGUMENT on every call, counted, no latency recorded."""
    config = LoadConfig(concurrency=2, warmup_requests=0, max_requests=6, duration_s=10.0)
    result = run_load(server.address, kserve_target(Shape(1, 4, 8)), config)
    assert result.errors == {"INVALID_ARGUMENT": 6}
    assert result.count == 0
