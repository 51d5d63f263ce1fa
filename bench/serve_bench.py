"""`make bench-serve`: what serving costs on top of onnxruntime, and how the service compares.

For each shape, at concurrency 1 and 8: onnxruntime in this process on the graph the service routes to
(the service's own Engine, so the same session options); an echo gRPC server (bench/echo_server.py: the
floor of Python gRPC here); a plain baseline server (bench/baseline_server.py); and the service (`python -m
service`) over both APIs, with default settings and with the variants whose trade-offs we measure
(spinning, intra-op threads, engine workers). Every server runs in its own process; one load client
(tests/load/loadgen.py, in this process) drives them all with the same pre-encoded requests.

Ratios are measured in one run: the rows of a (shape, concurrency) cell take turns round after round, and
each row's latencies are pooled over its rounds, so a noisy shared machine slows them alike. Prints
tables and writes a markdown report.

    python -m bench.serve_bench --out reports/serve_bench.md [--quick] [--model-dir models/attention]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from bench.harness.cpu import CpuMeter, process_cpu_s, thread_cpu_s
from bench.harness.servers import start_bench_server, start_in_parallel, stop_bench_server
from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service.core.types import INPUT, OUTPUT
from service.engine.model_dir import ModelDirectory, load_model_directory
from service.engine.sessions import Engine
from service.host.cpu_quota import usable_cores
from tests.load.loadgen import CHANNEL_OPTIONS, LoadConfig, LoadResult, run_load, summarize
from tests.load.workload import Shape, Target, kserve_target, v1_target
from tests.server_process import start_server

SHAPES = (Shape(1, 16), Shape(1, 128), Shape(1, 2048), Shape(8, 2048))
SMALL_SHAPES = SHAPES[:2]  # the concurrency-8 throughput target
BIG_SHAPE = SHAPES[3]  # the message-size and ≤ 10% overhead target
CONCURRENCIES = (1, 8)

# Service variants: name -> extra `python -m service` flags. "service" is the default settings.
SERVICE_VARIANTS: dict[str, tuple[str, ...]] = {
    "service": (),
    "service spin": ("--allow-spinning", "true"),
    "service serial": ("--engine-workers", "1", "--narrow-max-tokens", "0"),
    "service w2": ("--engine-workers", "2", "--intra-op-threads", "1"),
}
INPROC = ("inproc", "inproc idle", "inproc spin")
BENCH_SERVERS = ("echo", "baseline", "lean")  # bench/<name>_server.py
IDLE_S = 0.001  # "inproc idle": the pause before each call, as a server at c=1 has between requests
# Between two rows' blocks: the baseline's onnxruntime threads spin on after its last run (its default), and at
# 0.05 s the row after it measured 10–25% slower than the same server later in the round.
ROW_GAP_S = 0.3


@dataclass(frozen=True)
class Row:
    """One line of a table: a server (or onnxruntime in-process) driven over one API."""

    label: str
    server: str  # a key of SERVICE_VARIANTS, one of BENCH_SERVERS, or one of INPROC
    api: str = "kserve"
    concurrencies: tuple[int, ...] = CONCURRENCIES
    shapes: tuple[Shape, ...] = SHAPES
    quick: bool = True  # also measured with --quick

    @property
    def inproc(self) -> bool:
        return self.server in INPROC

    @property
    def name(self) -> str:
        return self.label if self.inproc or self.server in BENCH_SERVERS else f"{self.label} ({self.api})"


ROWS = (
    Row("onnxruntime in-process", "inproc", "-", (1,)),
    Row("onnxruntime in-process, 1 ms idle before each call", "inproc idle", "-", (1,), SMALL_SHAPES),
    Row("onnxruntime in-process, spinning", "inproc spin", "-", (1,)),
    Row("echo server", "echo", "kserve bytes"),
    Row("baseline server", "baseline"),
    Row("lean server (decode, compute on the loop, encode)", "lean"),
    Row("service", "service", "kserve"),
    Row("service", "service", "v1"),
    Row("service, spinning", "service spin", "kserve"),
    Row("service, spinning", "service spin", "v1", (1,), SMALL_SHAPES, quick=False),
    Row("service, one run at a time (all cores)", "service serial", "kserve", CONCURRENCIES, SHAPES[:3], quick=False),
    Row("service, 2 engine workers × 1 intra-op thread", "service w2", "kserve", CONCURRENCIES, SHAPES[:3], False),
    Row("service, before this change (--before)", "service before", "kserve"),
)
BEFORE = "service before"  # the row that runs the service from another checkout, when --before names one


@dataclass(frozen=True)
class Budget:
    """How one (shape, concurrency) cell is measured: rounds × (each row for ≤ block_s and ≤ block_requests)."""

    rounds: int
    block_s: float
    block_requests: int
    warmup_requests: int


def budgets(quick: bool) -> dict[tuple[Shape, int], Budget]:
    full = {
        (SHAPES[0], 1): Budget(3, 1.5, 3000, 20),
        (SHAPES[0], 8): Budget(3, 1.5, 6000, 32),
        (SHAPES[1], 1): Budget(3, 1.5, 1500, 10),
        (SHAPES[1], 8): Budget(3, 2.0, 3000, 16),
        (SHAPES[2], 1): Budget(3, 2.0, 50, 2),
        (SHAPES[2], 8): Budget(2, 3.0, 60, 8),
        (BIG_SHAPE, 1): Budget(2, 3.0, 3, 1),
        (BIG_SHAPE, 8): Budget(1, 12.0, 8, 0),  # all 8 sent at once: the last waits for the 7 others
    }
    if not quick:
        return full
    short = {key: Budget(1, b.block_s / 2, b.block_requests, min(b.warmup_requests, 8)) for key, b in full.items()}
    short[(BIG_SHAPE, 1)] = Budget(1, 1.0, 1, 0)
    del short[(BIG_SHAPE, 8)]
    return short


# Sequential attnserve.v1 calls whose server-side timing (queue, compute, total) splits the c=1 latency.
BREAKDOWN_REQUESTS = {SHAPES[0]: 300, SHAPES[1]: 150, SHAPES[2]: 12, BIG_SHAPE: 3}

# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Running:
    name: str
    address: str
    process: subprocess.Popen
    stop: Callable[[], object]
    metric: Callable[[str], float] | None = None  # the service's /metrics, by sample name


def start_servers(model_dir: Path, names: set[str], before: Path | None = None) -> dict[str, Running]:
    """Every server a row needs, started in parallel, each in its own process; `before`: the checkout the
    "service before" row runs from."""

    def start(name: str) -> Running:
        if name in BENCH_SERVERS:
            process, port = start_bench_server(f"{name}_server", model_dir)
            return Running(name, f"127.0.0.1:{port}", process, lambda: stop_bench_server(process))
        if name == BEFORE:
            assert before is not None
            # Without --http-port: the checkout may predate it; its HTTP port, if any, stays at its default.
            service = start_server(model_dir.resolve(), env={"PYTHONPATH": str(before)}, cwd=before, http=False)
        else:
            service = start_server(model_dir, *SERVICE_VARIANTS[name])
        return Running(name, service.address, service.process, service.stop, service.metric)

    return start_in_parallel(sorted(names), start, lambda server: server.stop())


# ------------------------------------------------------------------------------------------ in-process


class InProcess:
    """onnxruntime in this process: the service's own Engine (same session options), on its routed graph."""

    def __init__(self, model: ModelDirectory) -> None:
        self.model = model
        self.engines = {"inproc": Engine(model, "cpu", 0, False), "inproc spin": Engine(model, "cpu", 0, True)}

    def graph(self, shape: Shape) -> str:
        return self.model.route("cpu", False, shape.seq).name

    def measure(self, key: str, shape: Shape, block_s: float, block_requests: int, warmup: int) -> LoadResult:
        """session.run back to back (or after IDLE_S of sleep, for "inproc idle"); req/s = 1 / mean latency."""
        engine = self.engines["inproc spin" if key == "inproc spin" else "inproc"]
        session = engine.sessions[self.graph(shape)]
        feed = {INPUT: np.random.default_rng(0).standard_normal(
            (shape.batch, shape.seq, shape.d_model), dtype=np.float32
        )}  # fmt: skip
        for _ in range(max(warmup, 1)):  # a first run at a new shape allocates; never time it
            session.run([OUTPUT], feed)
        idle = IDLE_S if key == "inproc idle" else 0.0
        latencies: list[float] = []
        started, cpu = time.perf_counter(), process_cpu_s(os.getpid())
        while len(latencies) < block_requests and time.perf_counter() - started < block_s:
            if idle:
                time.sleep(idle)
            t0 = time.perf_counter()
            session.run([OUTPUT], feed)
            latencies.append((time.perf_counter() - t0) * 1e3)
        result = summarize(key, latencies, sum(latencies) / 1e3, shape.tokens * len(latencies), shape.seq)
        result.server_cpu_s = process_cpu_s(os.getpid()) - cpu
        return result

    def cpu_per_sequence(self, shape: Shape, batch: int, seconds: float = 1.0) -> tuple[float, str]:
        """(the least CPU per sequence, in µs, that onnxruntime here needs for `shape` in runs of `batch`
        sequences, and on which session): single-threaded and all-cores sessions both timed, the cheaper kept."""
        engine = self.engines["inproc"]
        graph = self.graph(shape)
        feed = {INPUT: np.random.default_rng(0).standard_normal(
            (batch, shape.seq, shape.d_model), dtype=np.float32
        )}  # fmt: skip
        sessions = {"all cores": engine.sessions[graph]}
        if graph in engine.narrow_sessions:
            sessions["one thread"] = engine.narrow_sessions[graph]
        costs = {}
        for name, session in sessions.items():
            for _ in range(3):
                session.run([OUTPUT], feed)
            runs, started, cpu = 0, time.perf_counter(), process_cpu_s(os.getpid())
            while runs < 5 or time.perf_counter() - started < seconds / len(sessions):
                session.run([OUTPUT], feed)
                runs += 1
            costs[name] = (process_cpu_s(os.getpid()) - cpu) / (runs * batch) * 1e6
        best = min(costs, key=costs.__getitem__)
        return costs[best], best


# --------------------------------------------------------------------------------------------- the run


@dataclass
class Floor:
    """The least a request can cost the server: gRPC's (the echo's CPU per request) plus onnxruntime's CPU per
    sequence for this shape, in runs as large as the service's runs were in this cell."""

    echo_us: float
    compute_us: float
    batch: int  # sequences per run, the service's mean in this cell (rounded)
    session: str  # the cheaper onnxruntime session at that batch

    @property
    def total_us(self) -> float:
        return self.echo_us + self.compute_us


@dataclass
class Cell:
    shape: Shape
    concurrency: int
    results: dict[Row, LoadResult] = field(default_factory=dict)
    threads: dict[Row, dict[str, float]] = field(default_factory=dict)  # service rows: CPU s by thread name
    runs: dict[Row, tuple[float, float]] = field(default_factory=dict)  # service rows: (sequences, runs)
    floor: Floor | None = None


def _target(row: Row, shape: Shape) -> Target:
    if row.server == "echo":
        return kserve_target(shape).without_check()  # the echo answers the request's own bytes
    return v1_target(shape) if row.api == "v1" else kserve_target(shape)


def rows_for(shape: Shape, concurrency: int, quick: bool, before: bool = False) -> list[Row]:
    return [
        r
        for r in ROWS
        if concurrency in r.concurrencies
        and shape in r.shapes
        and (r.quick or not quick)
        and (before or r.server != BEFORE)
    ]


def _batch_sums(server: Running) -> tuple[float, float]:
    """(sequences run, engine runs) so far, from the service's attnserve_batch_size histogram."""
    assert server.metric is not None
    return server.metric("attnserve_batch_size_sum"), server.metric("attnserve_batch_size_count")


def measure_cell(
    shape: Shape, concurrency: int, budget: Budget, rows: list[Row], servers: dict[str, Running], inproc: InProcess
) -> Cell:
    """Each row for one block per round, rows taking turns; each row's blocks pooled."""
    cell = Cell(shape, concurrency)
    blocks: dict[Row, list[LoadResult]] = {row: [] for row in rows}
    targets = {row: _target(row, shape) for row in rows if not row.inproc}
    for round_ in range(budget.rounds):
        shift = round_ % len(rows)  # each round starts one row later: no row always follows the same one
        for row in rows[shift:] + rows[:shift]:
            warmup = budget.warmup_requests if round_ == 0 else min(budget.warmup_requests, concurrency)
            if row.inproc:
                result = inproc.measure(row.server, shape, budget.block_s, budget.block_requests, warmup)
            else:
                server = servers[row.server]
                config = LoadConfig(
                    concurrency=concurrency,
                    warmup_requests=warmup,
                    warmup_s=max(budget.block_s, 2.0),
                    max_requests=budget.block_requests,
                    duration_s=budget.block_s,
                    server_pid=server.process.pid,
                )
                # Per thread and per run, around the whole block (warm-up included): their shares, not totals.
                threads, runs = thread_cpu_s(server.process.pid), _batch_sums(server) if server.metric else None
                result = run_load(server.address, targets[row], config)
                if runs is not None:
                    after = thread_cpu_s(server.process.pid)
                    spent = cell.threads.setdefault(row, {})
                    for name, seconds in after.items():
                        spent[name] = spent.get(name, 0.0) + seconds - threads.get(name, 0.0)
                    sequences, count = _batch_sums(server)
                    old = cell.runs.get(row, (0.0, 0.0))
                    cell.runs[row] = (old[0] + sequences - runs[0], old[1] + count - runs[1])
            blocks[row].append(result)
            time.sleep(ROW_GAP_S)
    for row, results in blocks.items():
        merged = LoadResult.merge(results)
        merged.target = row.name
        cell.results[row] = merged
        print("  " + _line(merged), flush=True)
    echo = _find(cell, "echo", "kserve bytes")
    service_runs = next((runs for row, runs in cell.runs.items() if row.server == "service"), None)
    if concurrency > 1 and echo is not None and service_runs is not None and service_runs[1] > 0:
        batch = max(1, round(service_runs[0] / service_runs[1]))
        compute_us, session = inproc.cpu_per_sequence(shape, batch)
        cell.floor = Floor(echo.server_cpu_us_per_request, compute_us, batch, session)
        print(f"  floor: echo {cell.floor.echo_us:.0f} + compute {compute_us:.0f} µs (batch {batch}, {session})")
    return cell


def _line(r: LoadResult) -> str:
    errors = f"  errors {r.errors}" if r.errors else ""
    return (
        f"{r.target:<52} n={r.count:<5} p50 {r.p50_ms:8.2f}  p99 {r.p99_ms:8.2f} ms  "
        f"{r.throughput_rps:8.1f} req/s  CPU {_cpu(r)} µs/req{errors}"
    )


def _cpu(r: LoadResult) -> str:
    """Server CPU per request in µs (in-process rows: the process's CPU per call); – when not measured."""
    us = r.server_cpu_us_per_request
    return "–" if us != us else f"{us:,.0f}"  # nan: not measured


def measure_channels(servers: dict[str, Running], quick: bool) -> list[tuple[str, int, LoadResult]]:
    """Is one channel fair? The echo and the service at (1,16,512), concurrency 8, over 1 and 8 channels."""
    shape = SHAPES[0]
    blocks: dict[tuple[str, int], list[LoadResult]] = {}
    for _ in range(1 if quick else 2):
        for server in ("echo", "service"):
            target = kserve_target(shape)
            target = target.without_check() if server == "echo" else target
            for channels in (1, 8):
                config = LoadConfig(concurrency=8, channels=channels, max_requests=6000, duration_s=1.0)
                blocks.setdefault((server, channels), []).append(run_load(servers[server].address, target, config))
    return [(server, channels, LoadResult.merge(results)) for (server, channels), results in blocks.items()]


@dataclass
class Breakdown:
    """Medians over sequential attnserve.v1 calls (c=1) of the client's latency and the server's timing."""

    shape: Shape
    count: int
    client_ms: float
    total_ms: float  # servicer: request decoded -> answer ready (before the response is encoded)
    queue_ms: float  # waiting for the engine thread
    compute_ms: float  # session.run in the engine thread
    outside_ms: float  # client − total: gRPC, protobuf parse/serialize, codec, tobytes
    paired_overhead_ms: float  # median over calls of (client − compute) of the same call


async def _breakdown(address: str, shape: Shape, count: int, max_s: float) -> Breakdown:
    target = v1_target(shape)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = channel.unary_unary(target.method)
        payload = target.requests[0].payload
        await stub(payload)  # warm-up
        rows = []
        stop_at = time.perf_counter() + max_s
        while len(rows) < count and (not rows or time.perf_counter() < stop_at):
            t0 = time.perf_counter()
            answer = await stub(payload)
            client = (time.perf_counter() - t0) * 1e3
            timing = v1_pb.AttendResponse.FromString(answer).timing
            rows.append((client, timing.total_us / 1e3, timing.queue_us / 1e3, timing.compute_us / 1e3))
    med = [statistics.median(column) for column in zip(*rows, strict=True)]
    paired = statistics.median(client - compute for client, _, _, compute in rows)
    return Breakdown(shape, len(rows), med[0], med[1], med[2], med[3], med[0] - med[1], paired)


def measure_breakdowns(address: str, quick: bool) -> list[Breakdown]:
    out = []
    for shape, count in BREAKDOWN_REQUESTS.items():
        count = max(count // 3, 1) if quick else count
        out.append(asyncio.run(_breakdown(address, shape, count, max_s=5.0 if quick else 10.0)))
        time.sleep(0.05)
    return out


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Check:
    name: str
    measured: str
    ratio: float
    limit: float
    passed: bool
    lean: float | None = None  # the same ratio for the lean server: what this machine allows a Python server


def _find(cell: Cell | None, server: str, api: str = "kserve") -> LoadResult | None:
    if cell is None:
        return None
    return next((r for row, r in cell.results.items() if row.server == server and row.api in (api, "-")), None)


def _check(
    name: str, measured: str, ratio: float, limit: float, at_most: bool = True, lean: float | None = None
) -> Check:
    return Check(name, measured, ratio, limit, ratio <= limit if at_most else ratio >= limit, lean)


def target_checks(cells: dict[tuple[Shape, int], Cell], breakdowns: list[Breakdown]) -> list[Check]:
    """The targets of a lean request path (issue 16), each a ratio of two rows measured in the same cell."""
    checks = []
    for shape in SMALL_SHAPES:
        cell = cells.get((shape, 1))
        inproc, echo, lean = _find(cell, "inproc"), _find(cell, "echo", "kserve bytes"), _find(cell, "lean")
        for api in ("kserve", "v1"):
            service = _find(cell, "service", api)
            if service is None or inproc is None or echo is None:
                continue
            overhead = service.p50_ms - inproc.p50_ms
            checks.append(
                _check(
                    f"c=1 {shape} {api}: service p50 − in-process p50 ≤ 1.2 × echo p50",
                    f"{service.p50_ms:.2f} − {inproc.p50_ms:.2f} = {overhead:.2f} ms; echo {echo.p50_ms:.2f} ms",
                    overhead / echo.p50_ms,
                    1.2,
                    lean=None if lean is None else (lean.p50_ms - inproc.p50_ms) / echo.p50_ms,
                )
            )
    cell = cells.get((SHAPES[0], 8))
    service, lean = _find(cell, "service"), _find(cell, "lean")
    if cell is not None and cell.floor is not None and service is not None:
        floor = cell.floor
        checks.append(
            _check(
                f"c=8 {SHAPES[0]} kserve: server CPU per request ≤ 1.3 × floor",
                f"{service.server_cpu_us_per_request:.0f} µs; floor {floor.echo_us:.0f} (echo) + "
                f"{floor.compute_us:.0f} (compute, batch {floor.batch}) = {floor.total_us:.0f} µs",
                service.server_cpu_us_per_request / floor.total_us,
                1.3,
                lean=None if lean is None else lean.server_cpu_us_per_request / floor.total_us,
            )
        )
    for shape, limit in ((SHAPES[0], 1.3), (SHAPES[1], 1.2)):
        cell = cells.get((shape, 8))
        baseline, lean = _find(cell, "baseline"), _find(cell, "lean")
        for api in ("kserve", "v1"):
            service = _find(cell, "service", api)
            if service is None or baseline is None:
                continue
            checks.append(
                _check(
                    f"c=8 {shape} {api}: service throughput ≥ {limit} × baseline",
                    f"{service.throughput_rps:.1f} vs {baseline.throughput_rps:.1f} req/s",
                    service.throughput_rps / baseline.throughput_rps,
                    limit,
                    at_most=False,
                    lean=None if lean is None else lean.throughput_rps / baseline.throughput_rps,
                )
            )
    for shape in SHAPES[2:]:  # no regression on long sequences, against the code before (--before)
        for conc in CONCURRENCIES:
            cell = cells.get((shape, conc))
            service, before = _find(cell, "service"), _find(cell, BEFORE)
            if service is None or before is None:
                continue
            if conc == 1:
                ratio, shown = service.p50_ms / before.p50_ms, f"p50 {service.p50_ms:.1f} vs {before.p50_ms:.1f} ms"
            else:
                ratio = before.throughput_rps / service.throughput_rps
                shown = f"{service.throughput_rps:.1f} vs {before.throughput_rps:.1f} req/s"
            checks.append(
                _check(f"c={conc} {shape}: no regression against before (≤ 1.1× its time)", shown, ratio, 1.1)
            )
    cell = cells.get((BIG_SHAPE, 1))
    inproc = _find(cell, "inproc")
    for api in ("kserve", "v1"):
        service = _find(cell, "service", api)
        if service is None or inproc is None:
            continue
        overhead = service.p50_ms - inproc.p50_ms
        ratio = overhead / inproc.p50_ms
        checks.append(
            Check(
                f"c=1 {BIG_SHAPE} {api}: answers (no message-size error), overhead ≤ 10% of in-process",
                f"{service.p50_ms:.0f} − {inproc.p50_ms:.0f} = {overhead:.0f} ms; n={service.count}, "
                f"errors {service.errors or 'none'}",
                ratio,
                0.10,
                ratio <= 0.10 and not service.errors and service.count > 0,
            )
        )
    for b in breakdowns:
        if b.shape == BIG_SHAPE:
            ratio = b.paired_overhead_ms / b.compute_ms
            checks.append(
                _check(
                    "the same, paired per call (v1: client latency − server compute of that call)",
                    f"{b.paired_overhead_ms:.0f} ms over {b.compute_ms:.0f} ms compute; n={b.count}",
                    ratio,
                    0.10,
                )
            )
    return checks


def _rate(rps: float) -> str:
    return f"{rps:.1f}" if rps < 100 else f"{rps:.0f}"


def cell_table(cell: Cell) -> list[str]:
    lines = [
        "| server | API | p50 ms | p99 ms | req/s | server CPU µs/req | tokens/s | n | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in cell.results.items():
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"| {row.label} | {row.api} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {_rate(r.throughput_rps)} | {_cpu(r)} | "
            f"{r.tokens_per_s:,.0f} | {r.count} | {errors} |"
        )
    if cell.floor is not None:
        f = cell.floor
        lines += [
            "",
            f"Floor: echo {f.echo_us:,.0f} µs + onnxruntime in-process {f.compute_us:,.0f} µs per sequence (runs of "
            f"{f.batch}, the service's mean here; {f.session} session, the cheaper) = **{f.total_us:,.0f} µs** of "
            "CPU per request.",
        ]
    return lines


TRADEOFF_COLUMNS = (
    ("spinning", "service spin"),
    ("one run at a time", "service serial"),
    ("2 workers × 1 thread", "service w2"),
    ("baseline", "baseline"),
)


def tradeoffs(cells: dict[tuple[Shape, int], Cell]) -> list[str]:
    """The same service with other settings (and the baseline), against the default, cell by cell (kserve)."""
    lines = [
        "| shape | c | metric | service (default) | " + " | ".join(name for name, _ in TRADEOFF_COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(TRADEOFF_COLUMNS),
    ]
    for (shape, conc), cell in cells.items():
        base = _find(cell, "service")
        if base is None:
            continue

        def show(r: LoadResult, conc: int = conc) -> str:
            return f"{r.p50_ms:.2f}" if conc == 1 else _rate(r.throughput_rps)

        def rel(r: LoadResult | None, conc: int = conc, base: LoadResult = base) -> str:
            if r is None:
                return "–"
            ratio = r.p50_ms / base.p50_ms if conc == 1 else r.throughput_rps / base.throughput_rps
            return f"{show(r, conc)} ({ratio:.2f}×)"

        metric = "p50 ms" if conc == 1 else "req/s"
        others = " | ".join(rel(_find(cell, server)) for _, server in TRADEOFF_COLUMNS)
        lines.append(f"| {shape} | {conc} | {metric} | {show(base)} | {others} |")
    return lines


THREAD_ROLES = {
    "attn-loop": "event loop: gRPC's Python side, the gate, codecs, dataplane, small runs computed inline",
    "attn-engine": "engine threads: batches, session.run",
    "attn-onnxrt": "onnxruntime's intra-op pool threads",
    "event_engine": "gRPC core (EventEngine threads)",
    "python": "other Python threads: gRPC's poller (and, unnamed before, every thread)",
}


def thread_table(cells: dict[tuple[Shape, int], Cell]) -> list[str]:
    """Server CPU per request by thread, for the service and the code before (KServe API) at concurrency 8: each
    thread's share of the process's CPU over the blocks times the CPU per request."""
    lines = ["| shape | server | thread | µs CPU per request |", "|---|---|---|---|"]
    for (shape, conc), cell in cells.items():
        for row, spent in cell.threads.items():
            result = cell.results.get(row)
            total = sum(spent.values())
            if (
                conc == 1
                or result is None
                or total <= 0
                or row.server not in ("service", BEFORE)
                or row.api != "kserve"
            ):
                continue
            per_request = result.server_cpu_us_per_request
            for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
                if seconds / total >= 0.005:
                    role = THREAD_ROLES.get(name, name)
                    lines.append(f"| {shape} | {row.label} | {role} | {per_request * seconds / total:,.0f} |")
            lines.append(f"| {shape} | {row.label} | **all** | **{per_request:,.0f}** |")
    return lines


def stages_table(stages: dict[str, dict]) -> list[str]:
    """bench/serve_stages.py's steps, one column per checkout it ran on."""
    names = list(stages)
    steps = list(next(iter(stages.values()))["steps_us"]) if stages else []
    lines = ["| step | " + " | ".join(f"{n} µs" for n in names) + " |", "|---|" + "---|" * len(names)]
    for step in steps:
        cells = " | ".join(f"{stages[n]['steps_us'].get(step, float('nan')):,.0f}" for n in names)
        lines.append(f"| {step} | {cells} |")
    return lines


def run_stages(model_dir: Path, checkout: Path, seq: int, count: int) -> dict:
    """bench/serve_stages.py (this checkout's file) over `checkout`'s service package, in its own process."""
    script = Path(__file__).with_name("serve_stages.py")
    command = [sys.executable, str(script), "--model-dir", str(model_dir.resolve()), "--seq", str(seq)]
    done = subprocess.run(
        [*command, "--count", str(count)],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def breakdown_table(breakdowns: list[Breakdown], cells: dict[tuple[Shape, int], Cell]) -> list[str]:
    lines = [
        "| shape | n | client p50 | server total | queue (hop to engine thread) | compute (session.run) | "
        "outside the servicer | echo p50 | in-process p50 | in-process, 1 ms idle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in breakdowns:
        cell = cells.get((b.shape, 1))
        echo, inproc, idle = _find(cell, "echo", "kserve bytes"), _find(cell, "inproc"), _find(cell, "inproc idle")

        def ms(r: LoadResult | None) -> str:
            return f"{r.p50_ms:.2f}" if r is not None else "–"

        lines.append(
            f"| {b.shape} | {b.count} | {b.client_ms:.2f} | {b.total_ms:.2f} | {b.queue_ms:.2f} | {b.compute_ms:.2f} | "
            f"{b.outside_ms:.2f} | {ms(echo)} | {ms(inproc)} | {ms(idle)} |"
        )
    return lines


def report(
    cells: dict[tuple[Shape, int], Cell],
    checks: list[Check],
    breakdowns: list[Breakdown],
    channels: list[tuple[str, int, LoadResult]],
    stages: dict[str, dict],
    meter: dict[str, float],
    model: ModelDirectory,
    args: argparse.Namespace,
    wall_s: float,
) -> str:
    cores = usable_cores()
    lines = [
        "# Serving benchmark (CPU)",
        "",
        f"`python -m bench.serve_bench{' --quick' if args.quick else ''}` on "
        f"{platform.processor() or platform.machine()}, {cores} cores, d_model {model.d_model}, {model.num_heads} "
        f"heads, FP32, no mask; onnxruntime {ort.__version__}, grpcio {grpc.__version__}, Python "
        f"{platform.python_version()}. Whole run {wall_s:.0f} s; **other processes used "
        f"{meter['others_cpu_fraction']:.0%} of the machine meanwhile** (see the last section).",
        "",
        "Rows of one (shape, concurrency) cell take turns round after round (each round starting one row later, "
        f"{ROW_GAP_S:g} s apart) and each row's latencies are pooled over its rounds, so the ratios compare servers "
        "under the same machine noise. Closed loop: c callers on "
        "one channel, each sending its next request when its last is answered; latency is the client's, around "
        "each call; req/s = answers / (first send → last answer). In-process rows: `session.run` back to back "
        "in the benchmark's process, through the service's own Engine (same session options) on the graph the "
        "service routes to; their req/s is 1 / mean latency.",
        "",
        "Servers, each its own process: **echo** (bench/echo_server.py) answers the request's bytes, the floor "
        "of Python gRPC here. **lean** (bench/lean_server.py): ModelInfer decoded, computed on the event loop's "
        "thread (one intra-op thread up to 32 tokens, every core above), encoded, and nothing else (no checks, "
        "limits, metrics, logs or batching): the least a Python server can do per request. "
        "**baseline** (bench/baseline_server.py): KServe ModelInfer on grpc.aio, "
        "`np.frombuffer`, `session.run` through `asyncio.to_thread`, onnxruntime's default session options "
        f"(intra-op threads = physical cores = {_default_ort_threads(model)} here, spinning on), same graphs. "
        "**service**: `python -m service` with default settings (metrics on, access log at its default; spinning "
        "off; a request of ≤ 32 tokens that finds the engine idle computes at once on the event loop's thread, "
        "single-threaded, and a lone call of ≤ 128 tokens there with every core; other runs go to one engine "
        "thread per core, batched, requests of ≤ 512 tokens single-threaded side by side when several are in "
        "flight); **spinning**: `--allow-spinning true`; **one run at a time**: `--engine-workers 1 "
        "--narrow-max-tokens 0` (every run on every core, in turn); **2 engine workers × 1 intra-op thread**: "
        "`--engine-workers 2 --intra-op-threads 1`; **before this change**: the service of the checkout "
        "`--before` names, default settings.",
        "",
        "*Server CPU µs/req*: the server process's CPU (all its threads, /proc) over the measured phase divided by "
        "the answers; for in-process rows, the benchmark process's CPU per call (onnxruntime's threads included).",
        "",
    ]
    for (shape, conc), cell in cells.items():
        graph = model.route("cpu", False, shape.seq).name
        lines += [f"## {shape}, concurrency {conc} (graph `{graph}`)", "", *cell_table(cell), ""]
    lines += [
        "## Targets",
        "",
        "*lean server*: the same ratio for bench/lean_server.py, which does nothing but decode, compute and encode: "
        "how near this machine lets a Python gRPC server come to the target at all.",
        "",
        "| target | measured | ratio | limit | result | lean server |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        lean = "" if c.lean is None else f"{c.lean:.2f}"
        lines.append(
            f"| {c.name} | {c.measured} | {c.ratio:.2f} | {c.limit:.2f} | {'PASS' if c.passed else 'MISS'} | {lean} |"
        )
    cell = cells.get((SHAPES[1], 8))
    baseline, echo = _find(cell, "baseline"), _find(cell, "echo", "kserve bytes")
    if baseline is not None and echo is not None:
        lines += [
            "",
            f"For scale, {SHAPES[1]} at c=8: baseline / echo throughput = "
            f"{baseline.throughput_rps / echo.throughput_rps:.2f} (the issue saw about 0.4 on this machine).",
        ]
    lines += [
        "",
        "## Where the CPU goes, per request",
        "",
        "By thread, in the real server under load (concurrency 8): each thread's share of the server's CPU "
        "(/proc/PID/task, by the names service/host/thread_names.py gives them) times its CPU per request.",
        "",
        *thread_table(cells),
        "",
        f"By step, in one process without gRPC's transport (bench/serve_stages.py, {SHAPES[0]}, KServe "
        "ModelInfer; CPU of every thread of the process per request, each step timed alone). The whole handler "
        "is what the gate, the servicer and every step cost together; the compute alone is what no serving "
        "code can remove; gRPC's own share is the echo's CPU per request in the tables above.",
        "",
        *stages_table(stages),
        "",
        "## Where the time goes at c=1 (service, attnserve.v1 server timing)",
        "",
        "Sequential Attend calls to the default service; medians in ms. *server total*: from the decoded request "
        "to the answer ready in the core (`Timing.total_us`); *queue*: waiting for the engine thread; *compute*: "
        "`session.run` in that thread; *outside the servicer* = client − server total: gRPC both ways, protobuf "
        "parse and serialize, the codec and `tobytes`.",
        "",
        *breakdown_table(breakdowns, cells),
        "",
        "## Trade-offs: spinning, intra-op threads, engine workers",
        "",
        "KServe API. c=1: p50 ms (lower is better); c=8: req/s (higher is better); in brackets, against the "
        "default service in the same cell.",
        "",
        *tradeoffs(cells),
        "",
        "## Load client: one channel or eight",
        "",
        "| server | channels | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for server, n, r in channels:
        lines.append(f"| {server} | {n} | {_rate(r.throughput_rps)} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |")
    lines += [
        "",
        f"{SHAPES[0]}, concurrency 8; 8 channels = 8 HTTP/2 connections (local subchannel pools). The tables "
        "above use one channel.",
        "",
        "## Machine and threads",
        "",
        f"- {meter['cores']} CPUs. The load client, gRPC (its poller thread and the event loop), and onnxruntime's "
        "intra-op threads of the server being measured share them; the servers not being measured are idle.",
        f"- This run's processes (benchmark + servers) used {meter['ours_cpu_fraction']:.0%} of the machine; other "
        f"processes used {meter['others_cpu_fraction']:.0%} (from /proc/stat). The machine is shared: absolute "
        "numbers move between runs, the ratios within a cell much less.",
        "",
    ]
    return "\n".join(lines)


def _default_ort_threads(model: ModelDirectory) -> int:
    session = ort.InferenceSession(str(model.route("cpu", False, 16).path), providers=["CPUExecutionProvider"])
    return session.get_session_options().intra_op_num_threads or usable_cores()


def print_checks(checks: list[Check]) -> None:
    print("\ntargets:")
    for c in checks:
        lean = "" if c.lean is None else f"; lean server {c.lean:.2f}"
        verdict = "PASS" if c.passed else "MISS"
        print(f"  {verdict}  {c.name}: {c.measured}  (ratio {c.ratio:.2f}, limit {c.limit:.2f}{lean})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    p.add_argument("--out", type=Path, default=Path("reports/serve_bench.md"))
    p.add_argument("--quick", action="store_true", help="one round, shorter blocks, fewer rows, no (8,2048,512) at c=8")
    p.add_argument("--json", type=Path, default=None, help="also write every result as JSON here")
    p.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout of this repository (e.g. a git worktree of an older commit): its service is "
        "measured beside this one in every cell, and its steps beside this one's",
    )
    p.add_argument(
        "--provider",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="the services' provider (default: theirs, auto); in-process rows and the baseline stay on the CPU",
    )
    args = p.parse_args(argv)
    if args.provider is not None:
        # Every `python -m service` started below inherits it (Settings reads ATTNSERVE_*): no other code changes.
        os.environ["ATTNSERVE_PROVIDER"] = args.provider
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"bench.serve_bench: no model at {args.model_dir}; run `make export` first")
    started = time.perf_counter()
    model = load_model_directory(args.model_dir)
    plan = budgets(args.quick)
    names = {r.server for r in ROWS if not r.inproc and (r.quick or not args.quick)}
    if args.before is None:
        names.discard(BEFORE)
    print(f"starting {', '.join(sorted(names))} ...", flush=True)
    servers = start_servers(args.model_dir, names, args.before)
    try:
        inproc = InProcess(model)
        meter = CpuMeter([os.getpid(), *(s.process.pid for s in servers.values())])
        cells: dict[tuple[Shape, int], Cell] = {}
        for shape in SHAPES:
            for conc in CONCURRENCIES:
                if (shape, conc) in plan:
                    print(f"{shape} c={conc} (graph {inproc.graph(shape)})", flush=True)
                    rows = rows_for(shape, conc, args.quick, args.before is not None)
                    cells[(shape, conc)] = measure_cell(shape, conc, plan[(shape, conc)], rows, servers, inproc)
        print("c=1 breakdown (v1 server timing)", flush=True)
        breakdowns = measure_breakdowns(servers["service"].address, args.quick)
        for b in breakdowns:
            print(
                f"  {b.shape!s:<14} client {b.client_ms:8.2f}  server {b.total_ms:8.2f}  queue {b.queue_ms:6.2f}  "
                f"compute {b.compute_ms:8.2f}  outside {b.outside_ms:7.2f} ms",
                flush=True,
            )
        print(f"channels: {SHAPES[0]} c=8 over 1 and 8 channels", flush=True)
        channels = measure_channels(servers, args.quick)
        for server, n, r in channels:
            print(f"  {server:<8} {n} channel(s): {r.throughput_rps:8.1f} req/s  p50 {r.p50_ms:.2f} ms", flush=True)
        usage = meter.stop()
    finally:
        for server in servers.values():
            server.stop()
    print("steps (bench/serve_stages.py)", flush=True)
    checkouts = {"this checkout": Path(__file__).resolve().parents[1]}
    if args.before is not None:
        checkouts = {"before": args.before.resolve(), "after": checkouts["this checkout"]}
    count = 500 if args.quick else 2000
    stages = {name: run_stages(args.model_dir, path, SHAPES[0].seq, count) for name, path in checkouts.items()}
    checks = target_checks(cells, breakdowns)
    print_checks(checks)
    text = report(cells, checks, breakdowns, channels, stages, usage, model, args, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwritten to {args.out}")
    if args.json:
        data = {
            "cells": [
                {
                    "shape": str(s),
                    "concurrency": c,
                    "rows": [{"row": row.name, **r.to_dict()} for row, r in rows.items()],
                }
                for (s, c), rows in ((key, cell.results) for key, cell in cells.items())
            ],
            "breakdowns": [{**b.__dict__, "shape": str(b.shape)} for b in breakdowns],
            "checks": [c.__dict__ for c in checks],
            "machine": usage,
        }
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
