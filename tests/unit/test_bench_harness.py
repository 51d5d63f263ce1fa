"""bench/harness on its own: the rounds' order and errors, the ratio cells, parallel start-up's clean-up, the
CPU meter and stopping a process. No server and no load: fast, and no timing assertion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from bench.harness.cpu import CpuMeter, process_cpu_s
from bench.harness.rounds import Series, ServerError, ratio_cells, rotated, rotated_rounds
from bench.harness.servers import start_in_parallel, stop_bench_server
from tests.load.loadgen import LoadResult, summarize


def _result(rps: float, errors: dict[str, int] | None = None) -> LoadResult:
    """A block of 10 calls taking 10/rps seconds in all."""
    result = summarize("t", [1e3 / rps] * 10, 10 / rps, 10, 1)
    result.errors = errors or {}
    return result


class FakeProcess:
    def poll(self) -> int | None:
        return None


@dataclass
class FakeServer:
    """What the rounds read of a server: whether it is alive, and its process's exit code for the error."""

    up: bool = True
    process: FakeProcess = field(default_factory=FakeProcess)

    def alive(self) -> bool:
        return self.up


def test_each_name_goes_first_once_in_as_many_rounds() -> None:
    names = ["a", "b", "c"]
    orders = [rotated(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {order[0] for order in orders} == set(names)


def test_rotated_rounds_yield_the_counted_rounds_after_a_warm_up() -> None:
    calls: list[str] = []

    def block(name: str) -> LoadResult:
        calls.append(name)
        return _result(100.0)

    counted = list(rotated_rounds({"a": FakeServer(), "b": FakeServer()}, 2, "t", block))
    assert calls == ["a", "b", "b", "a", "a", "b"]  # warm-up, then rounds 1 and 2, rotated
    assert [order for order, _ in counted] == [["b", "a"], ["a", "b"]]
    assert all(set(results) == {"a", "b"} for _, results in counted)


def test_a_block_with_errors_or_a_server_gone_stops_the_rounds() -> None:
    with pytest.raises(ServerError, match=r"a \(t\): errors \{'UNAVAILABLE': 1\}"):
        list(rotated_rounds({"a": FakeServer()}, 1, "t", lambda _: _result(100.0, {"UNAVAILABLE": 1})))
    with pytest.raises(ServerError, match="b"):
        list(rotated_rounds({"b": FakeServer(up=False)}, 1, "t", lambda _: _result(100.0)))


def test_ratios_are_taken_round_by_round() -> None:
    series = Series({"x": [_result(200.0), _result(150.0)], "ref": [_result(100.0), _result(100.0)]})
    assert series.ratios("x", "ref") == pytest.approx([2.0, 1.5])
    assert series.merged("x").count == 20
    assert ratio_cells(series.ratios("x", "ref"), reference=False) == ("1.75", "1.50–2.00")
    assert ratio_cells([], reference=True) == ("1 (reference)", "–")


def test_a_failed_start_stops_the_servers_that_started() -> None:
    stopped: list[str] = []

    def start(name: str) -> str:
        if name == "bad":
            raise OSError("no port")
        return name

    with pytest.raises(RuntimeError, match="bad: no port"):
        start_in_parallel(["a", "bad", "c"], start, stopped.append)
    assert sorted(stopped) == ["a", "c"]
    assert start_in_parallel(["a", "c"], start, stopped.append) == {"a": "a", "c": "c"}


def test_cpu_meter_reads_this_process() -> None:
    meter = CpuMeter([os.getpid()])
    before = process_cpu_s(os.getpid())
    sum(i * i for i in range(2_000_000))  # some CPU of our own
    usage = meter.stop()
    assert process_cpu_s(os.getpid()) > before
    assert set(usage) == {"wall_s", "cores", "ours_cpu_fraction", "others_cpu_fraction"}
    assert usage["wall_s"] > 0 and usage["ours_cpu_fraction"] > 0 and usage["others_cpu_fraction"] >= 0


def test_a_process_gone_has_no_cpu_time() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert process_cpu_s(process.pid) == 0.0


def test_stop_bench_server_terminates_and_returns_the_exit_code() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_bench_server(process) == -signal.SIGTERM
    assert stop_bench_server(process) == -signal.SIGTERM  # stopping it again is harmless
