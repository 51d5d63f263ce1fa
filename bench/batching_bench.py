"""`make bench-batching`: what dynamic batching buys in throughput and latency, and how it holds under overload.

Three servers, one process each, started in parallel: **batching** (`python -m service`, default flags
plus --batching-flags),
**off** (`--max-batch-sequences 1`: each request runs alone) and the **echo** gRPC server (bench/echo_server.py,
the floor of Python gRPC here). One load client in this process loads one server at a time:

1. mixed lengths 8–512 (KServe, uniform), closed loop, concurrency 16: batching vs off;
2. (1,16,512) KServe, closed loop, concurrency 8: batching vs off vs echo;
3. overload, batching only: Poisson arrivals at 4 × section 1's batching throughput over the mixed target, while
   the server's RSS is sampled; every request must be answered (OK or refused), accepted ones in time.

Sections 1 and 2 run a warm-up round, then --rounds rounds of every server for --round-s each, in an order
rotated round by round; ratios come from the same round (adjacent measurements), so machine noise slower than a
round cancels out. Exit 0 whatever the verdicts (they are in the report); 1 if a server erred or died in
sections 1–2.

    python -m bench.batching_bench --model-dir models/attention --out reports/batching_bench.md [--rounds N]
        [--round-s S] [--overload-s S] [--provider auto] [--batching-flags "..."] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import onnxruntime as ort

from bench.harness.cpu import CpuMeter
from bench.harness.provenance import code_version
from bench.harness.rounds import Series, ServerError, measure_rounds, ratio_cells
from bench.harness.servers import start_bench_server, start_in_parallel, stop_bench_server
from bench.harness.workloads import (
    MIX,
    MIX_CONCURRENCY,
    MIX_POOL,
    MIX_SEED,
    SMALL,
    SMALL_CONCURRENCY,
    mixed_target,
)
from service.app.settings import parse_settings
from service.core.seq_buckets import bucket_labels
from service.host.cpu_quota import usable_cores
from tests.load.loadgen import LoadConfig, LoadResult, run_load
from tests.load.workload import Target, kserve_target
from tests.server_process import ServerProcess, start_server

BATCHING, OFF, ECHO = "batching", "off", "echo"
# name -> (extra `python -m service` flags besides --provider, what it is)
SERVICES: dict[str, tuple[tuple[str, ...], str]] = {
    BATCHING: ((), "dynamic batching"),
    OFF: (("--max-batch-sequences", "1"), "batching off: each request runs alone"),
}
DESCRIPTIONS = {**{name: what for name, (_, what) in SERVICES.items()}, ECHO: "echo gRPC server: the floor"}

# Targets.
MIN_SPEEDUP = 1.3  # mixed lengths: batching / off throughput
MAX_PADDING = 0.15  # mean padded share of a run's computed tokens
MIN_ECHO_RATIO = 0.70  # (1,16,512): batching / echo throughput
OVERLOAD_FACTOR = 4.0  # offered load, × section 1's batching throughput
OVERLOAD_TIMEOUT_S = 60.0  # each call's deadline: far beyond any queue, so every call gets an answer
OVERLOAD_ERRORS = frozenset({"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})  # how a server may refuse work
LATENCY_RUNS = 3  # an accepted request waits at most its queue delay + this many runs' compute
MAX_RSS_GROWTH = 0.10
RSS_EVERY_S = 0.5
DROP_REASONS = ("queue_full", "deadline", "cancelled")
# A verdict line of the report, for tests and tools: the check's name and its outcome.
VERDICT_LINE = re.compile(r"^- `([\w+.-]+)`: .* — (PASS|FAIL)$", re.M)
PROVIDER = re.compile(r"attnserve ready: .*provider (\w+)")


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Endpoint:
    """A server under load: a service (with its metrics and log) or the echo server (a bare process)."""

    name: str
    address: str
    process: subprocess.Popen
    service: ServerProcess | None = None
    flags: tuple[str, ...] = ()  # the service's flags, as started
    added: tuple[str, ...] = ()  # of those, the ones --batching-flags added

    def alive(self) -> bool:
        return self.process.poll() is None

    def provider(self) -> str:
        """What the service reported in its ready line (auto resolves to cpu or cuda there)."""
        if self.service is None:
            return "–"
        found = PROVIDER.search(self.service.log())
        return found.group(1) if found else "unknown"

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
        else:
            stop_bench_server(self.process)


def start_endpoint(
    name: str, model_dir: Path, provider: str, log_dir: Path, extra: tuple[str, ...] = ()
) -> Endpoint:  # fmt: skip
    if name == ECHO:
        process, port = start_bench_server("echo_server", model_dir)
        return Endpoint(name, f"127.0.0.1:{port}", process)
    flags = ("--provider", provider, *SERVICES[name][0], *extra)
    # stdout (the access log: refused requests in section 3) to a file, not to a reader thread in this process
    # that would take the load client's GIL.
    service = start_server(model_dir, *flags, stdout=log_dir / f"{name}.access.jsonl")
    return Endpoint(name, service.address, service.process, service, flags, extra)


def start_endpoints(
    model_dir: Path, provider: str, log_dir: Path, batching_flags: tuple[str, ...] = ()
) -> dict[str, Endpoint]:  # fmt: skip
    """batching (with batching_flags added), off and echo, started in parallel; none left running if one fails."""

    def start(name: str) -> Endpoint:
        return start_endpoint(name, model_dir, provider, log_dir, batching_flags if name == BATCHING else ())

    return start_in_parallel([*SERVICES, ECHO], start, Endpoint.stop)


def stop_endpoints(endpoints: dict[str, Endpoint]) -> None:
    with ThreadPoolExecutor(max(len(endpoints), 1)) as pool:  # each drains on its own: no need to wait in turn
        list(pool.map(Endpoint.stop, endpoints.values()))


class Counters:
    """Samples of one service's /metrics read now and again later: the deltas are what happened in between."""

    def __init__(self, service: ServerProcess, samples: dict[str, tuple[str, dict[str, str]]]) -> None:
        self.service, self.samples = service, samples  # key -> (sample name, labels it must have)
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        return {key: self.service.metric(name, **labels) for key, (name, labels) in self.samples.items()}

    def deltas(self) -> dict[str, float]:
        """After − before per key; NaN for every key once the server is gone."""
        try:
            after = self._read()
        except OSError:
            return {key: math.nan for key in self.samples}
        return {key: after[key] - self.before[key] for key in self.samples}


def _per_run(sum_: float, count: float) -> float:
    return sum_ / count if count > 0 else math.nan


# --------------------------------------------------------------------------------------------- measuring


def closed_loop(concurrency: int, round_s: float) -> LoadConfig:
    return LoadConfig(
        concurrency=concurrency,
        warmup_s=max(round_s, 1.0),  # each block opens a fresh channel: its first calls pay for the connection
        max_requests=10**9,  # bounded by time only
        duration_s=round_s,
    )


@dataclass
class Mixed:
    series: Series
    runs: float  # engine runs of the batching server over the section
    mean_batch: float  # sequences per run
    mean_padding: float  # padded / computed tokens per run


def measure_mixed(endpoints: dict[str, Endpoint], target: Target, rounds: int, round_s: float) -> Mixed:
    service = endpoints[BATCHING].service
    assert service is not None
    counters = Counters(
        service,
        {
            f"{metric}_{part}": (f"attnserve_{metric}_{part}", {})
            for metric in ("batch_size", "padding_ratio")
            for part in ("sum", "count")
        },
    )
    targets = {BATCHING: target, OFF: target}
    series = measure_rounds(endpoints, targets, closed_loop(MIX_CONCURRENCY, round_s), rounds, "mixed")
    d = counters.deltas()
    return Mixed(
        series,
        d["batch_size_count"],
        _per_run(d["batch_size_sum"], d["batch_size_count"]),
        _per_run(d["padding_ratio_sum"], d["padding_ratio_count"]),
    )


def measure_small(endpoints: dict[str, Endpoint], rounds: int, round_s: float) -> Series:
    target = kserve_target(SMALL)
    targets = {BATCHING: target, OFF: target, ECHO: target.without_check()}  # the echo returns the request
    return measure_rounds(endpoints, targets, closed_loop(SMALL_CONCURRENCY, round_s), rounds, "small")


class RssSampler:
    """A thread reading the service's process_resident_memory_bytes every `every_s` until stopped."""

    def __init__(self, service: ServerProcess, every_s: float) -> None:
        self.service, self.every_s = service, every_s
        self.samples = [service.metric("process_resident_memory_bytes")]  # the baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.samples.append(self.service.metric("process_resident_memory_bytes"))
            except OSError:  # the server is gone: the report says so
                return

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.samples


@dataclass
class Overload:
    capacity_rps: float
    rate_rps: float
    duration_s: float
    max_in_flight: int
    result: LoadResult
    queue_delay_s: float  # the batching server's --max-queue-delay-us
    compute: dict[str, tuple[float, float]]  # seq bucket -> (compute seconds, engine runs) over the window
    rss: list[float]  # bytes; the first is the baseline
    dropped: dict[str, float]  # reason -> requests
    exit_code: int | None  # None: still running after the overload

    @property
    def unexpected_errors(self) -> dict[str, int]:
        return {code: n for code, n in self.result.errors.items() if code not in OVERLOAD_ERRORS}

    @property
    def all_answered(self) -> bool:
        return self.result.sent == self.result.count + self.result.error_count

    @property
    def rss_growth(self) -> float:
        return max(self.rss) / self.rss[0] - 1.0

    def limit_s(self, bucket: str) -> float:
        seconds, runs = self.compute.get(bucket, (math.nan, 0.0))
        return self.queue_delay_s + LATENCY_RUNS * _per_run(seconds, runs)


def overload(endpoint: Endpoint, model_dir: Path, target: Target, capacity_rps: float, duration_s: float) -> Overload:
    """Poisson arrivals at OVERLOAD_FACTOR × capacity for duration_s; the server's counters and RSS meanwhile."""
    service = endpoint.service
    assert service is not None
    rate = OVERLOAD_FACTOR * max(capacity_rps, 1.0)
    max_in_flight = max(4096, math.ceil(8 * rate * 2.0))  # far above what the server holds: the client never throttles
    config = LoadConfig(
        warmup_requests=0,  # sections 1–2 warmed the server; a warm-up here would only shift the window
        rate_rps=rate,
        poisson=True,
        duration_s=duration_s,
        max_requests=10**9,  # bounded by time only
        max_in_flight=max_in_flight,
        timeout_s=OVERLOAD_TIMEOUT_S,
        seed=1,
    )
    # The server's settings as it parsed them: the same environment, the same flags.
    settings = parse_settings(["--model-dir", str(model_dir), *endpoint.flags])
    buckets = bucket_labels(settings.seq_bucket_bounds)
    samples = {
        f"{bucket}_{part}": (f"attnserve_compute_duration_seconds_{part}", {"seq_bucket": bucket})
        for bucket in buckets
        for part in ("sum", "count")
    }
    samples |= {reason: ("attnserve_dropped_requests_total", {"reason": reason}) for reason in DROP_REASONS}
    counters = Counters(service, samples)
    rss = RssSampler(service, RSS_EVERY_S)  # baseline read now, after sections 1–2 warmed the server
    try:
        result = run_load(endpoint.address, target, config)
    finally:
        samples_rss = rss.stop()
    d = counters.deltas()
    return Overload(
        capacity_rps=capacity_rps,
        rate_rps=rate,
        duration_s=duration_s,
        max_in_flight=max_in_flight,
        result=result,
        queue_delay_s=settings.max_queue_delay_us / 1e6,
        compute={bucket: (d[f"{bucket}_sum"], d[f"{bucket}_count"]) for bucket in buckets},
        rss=samples_rss,
        dropped={reason: d[reason] for reason in DROP_REASONS},
        exit_code=endpoint.process.poll(),
    )


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"- `{self.name}`: {self.detail} — {'PASS' if self.passed else 'FAIL'}"


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def checks(mixed: Mixed, small: Series, over: Overload) -> list[Check]:
    speedup = mixed.series.ratios(BATCHING, OFF)
    batching, off = mixed.series.merged(BATCHING), mixed.series.merged(OFF)
    echo_ratio = small.ratios(BATCHING, ECHO)
    out = [
        Check(
            "mixed-throughput",
            statistics.median(speedup) >= MIN_SPEEDUP,
            f"mixed 8–512, c={MIX_CONCURRENCY}: req/s batching ÷ off, median (min–max per round) {_spread(speedup)}; "
            f"target ≥ {MIN_SPEEDUP:g}",
        ),
        Check(
            "mixed-p99",
            batching.p99_ms <= off.p99_ms,
            f"mixed 8–512: p99 batching {batching.p99_ms:.1f} ms vs off {off.p99_ms:.1f} ms; target batching ≤ off",
        ),
        Check(
            "mixed-padding",
            mixed.mean_padding <= MAX_PADDING,
            f"mixed 8–512: mean padding per run {mixed.mean_padding:.1%} over {mixed.runs:.0f} runs; target ≤ "
            f"{MAX_PADDING:.0%}",
        ),
        Check(
            "small-vs-echo",
            statistics.median(echo_ratio) >= MIN_ECHO_RATIO,
            f"{SMALL}, c={SMALL_CONCURRENCY}: req/s batching ÷ echo, median (min–max per round) {_spread(echo_ratio)}"
            f"; target ≥ {MIN_ECHO_RATIO:.2f}",
        ),
    ]
    r = over.result
    out.append(
        Check(
            "overload-answered",
            over.all_answered and not over.unexpected_errors and over.exit_code is None,
            f"overload: sent {r.sent} = OK {r.count} + errors {r.error_count}: "
            f"{'yes' if over.all_answered else 'NO'}; errors other than {'/'.join(sorted(OVERLOAD_ERRORS))}: "
            f"{over.unexpected_errors or 'none'}; server "
            f"{'still serving' if over.exit_code is None else f'exited {over.exit_code}'}",
        )
    )
    for bucket, stats in r.by_bucket.items():
        limit_ms = over.limit_s(bucket) * 1e3
        out.append(
            Check(
                f"overload-p99-{bucket}",
                stats.p99_ms <= limit_ms,
                f"overload, accepted seq ≤ {bucket}: p99 {stats.p99_ms:.1f} ms; limit {limit_ms:.1f} ms (queue delay"
                f" + {LATENCY_RUNS} × mean compute per run)",
            )
        )
    out.append(
        Check(
            "overload-rss",
            over.rss_growth <= MAX_RSS_GROWTH,
            f"overload: RSS {over.rss[0] / 2**20:.0f} → max {max(over.rss) / 2**20:.0f} MiB, growth "
            f"{over.rss_growth:+.1%}; limit {MAX_RSS_GROWTH:.0%}",
        )
    )
    return out


def _settings(name: str, endpoints: dict[str, Endpoint]) -> str:
    """What a server is; the batching server's with the flags the bench added."""
    added = " ".join(endpoints[name].added) or "default flags"
    return f"{DESCRIPTIONS[name]}, {added}" if name == BATCHING else DESCRIPTIONS[name]


def mixed_table(mixed: Mixed, endpoints: dict[str, Endpoint]) -> list[str]:
    lines = [
        "| server | settings | req/s | tokens/s | p50 ms | p99 ms | req/s ÷ off: median | spread (min–max) | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = mixed.series.ratios(BATCHING, OFF)
    for name in (BATCHING, OFF):
        r = mixed.series.merged(name)
        ratio, spread = ratio_cells(ratios, reference=name == OFF)
        lines.append(
            f"| {name} | {_settings(name, endpoints)} | {r.throughput_rps:.1f} | {r.tokens_per_s:,.0f} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {ratio} | {spread} | {r.count} |"
        )
    return lines


def small_table(small: Series) -> list[str]:
    lines = [
        "| server | req/s | p50 ms | p99 ms | req/s ÷ echo: median | spread (min–max) | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (BATCHING, OFF, ECHO):
        r = small.merged(name)
        ratio, spread = ratio_cells(small.ratios(name, ECHO), reference=name == ECHO)
        lines.append(
            f"| {name} | {r.throughput_rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {ratio} | {spread} | {r.count} |"
        )
    return lines


def overload_tables(over: Overload) -> list[str]:
    r = over.result
    errors = ", ".join(f"{code} {n}" for code, n in sorted(r.errors.items())) or "none"
    lines = [
        "| offered req/s | capacity req/s | seconds | sent | answered OK | errors | errors by code | "
        "every request answered | errors only refusals |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {over.rate_rps:.0f} | {over.capacity_rps:.1f} | {over.duration_s:g} | {r.sent} | {r.count} | "
        f"{r.error_count} | {errors} | {'yes' if over.all_answered else 'NO'} | "
        f"{'no' if over.unexpected_errors else 'yes'} |",
        "",
        "| seq bucket (accepted) | n | p50 ms | p99 ms | compute ms per run | runs | limit ms | p99 ≤ limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bucket, stats in r.by_bucket.items():
        seconds, runs = over.compute.get(bucket, (math.nan, 0.0))
        limit_ms = over.limit_s(bucket) * 1e3
        lines.append(
            f"| ≤ {bucket} | {stats.count} | {stats.p50_ms:.1f} | {stats.p99_ms:.1f} | "
            f"{_per_run(seconds, runs) * 1e3:.1f} | {runs:.0f} | {limit_ms:.1f} | "
            f"{'PASS' if stats.p99_ms <= limit_ms else 'FAIL'} |"
        )
    dropped = " | ".join(f"{over.dropped[reason]:.0f}" for reason in DROP_REASONS)
    lines += [
        "",
        "| RSS baseline MiB | RSS max MiB | growth | limit | samples | "
        + " | ".join(f"dropped: {reason}" for reason in DROP_REASONS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(DROP_REASONS),
        f"| {over.rss[0] / 2**20:.0f} | {max(over.rss) / 2**20:.0f} | {over.rss_growth:+.1%} | "
        f"{MAX_RSS_GROWTH:.0%} | {len(over.rss)} | {dropped} |",
    ]
    return lines


def report(
    mixed: Mixed,
    small: Series,
    over: Overload,
    endpoints: dict[str, Endpoint],
    usage: dict[str, float],
    code: str,
    args: argparse.Namespace,
    wall_s: float,
) -> str:
    command = (
        f"python -m bench.batching_bench --model-dir {args.model_dir} --rounds {args.rounds} --round-s "
        f"{args.round_s:g} --overload-s {args.overload_s:g} --provider {args.provider}"
        f"{f' --batching-flags {shlex.quote(args.batching_flags)}' if args.batching_flags else ''}"
        f"{' --quick' if args.quick else ''}"
    )
    providers = ", ".join(f"{name} {endpoints[name].provider()}" for name in SERVICES)
    lines = [
        "# Dynamic batching benchmark",
        "",
        f"`{command}`, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, on "
        f"{platform.processor() or platform.machine()}, {usable_cores()} cores; onnxruntime {ort.__version__}, "
        f"grpcio {grpc.__version__}, Python {platform.python_version()}; provider: {providers}; code {code}. "
        f"Whole run {wall_s:.0f} s; other processes used {usage['others_cpu_fraction']:.0%} of the machine "
        "meanwhile.",
        "",
        f"## 1. Mixed lengths {MIX} (uniform), KServe, closed loop, concurrency {MIX_CONCURRENCY}",
        "",
        f"Counted rounds: {args.rounds} of {args.round_s:g} s per server, after one warm-up round; a pool of "
        f"{MIX_POOL} requests (seed {MIX_SEED}).",
        "",
        *mixed_table(mixed, endpoints),
        "",
        f"Batching server over this section (warm-up round included): {mixed.runs:.0f} engine runs, mean "
        f"{mixed.mean_batch:.2f} sequences per run, mean padding {mixed.mean_padding:.1%} of a run's computed "
        "tokens.",
        "",
        f"## 2. {SMALL}, KServe, closed loop, concurrency {SMALL_CONCURRENCY}",
        "",
        *small_table(small),
        "",
        f"## 3. Overload: Poisson arrivals at {OVERLOAD_FACTOR:g} × capacity, batching server only",
        "",
        f"Capacity = the batching server's req/s in section 1; the mixed target; each call's deadline "
        f"{OVERLOAD_TIMEOUT_S:g} s; at most {over.max_in_flight} calls in flight (far above what the server "
        "holds; a call beyond it would count as the error CLIENT_OVERLOADED). Queue delay "
        f"{over.queue_delay_s * 1e3:g} ms (the server's --max-queue-delay-us).",
        "",
        *overload_tables(over),
        "",
        "## Verdict",
        "",
        *(check.line() for check in checks(mixed, small, over)),
        "",
        "## Method",
        "",
        "One process per server, started together; one load client (tests/load/loadgen.py, this process) loads one"
        " server at a time. In sections 1–2 every round runs each server for the round's length, the order rotated"
        " round by round after a warm-up round that is not counted; a ratio is taken between measurements of the "
        "same round, and the tables give its median and min–max over rounds (req/s, tokens/s, p50 and p99 pooled "
        "over rounds). Engine runs, sequences per run and padding come from the batching server's own "
        "histograms (attnserve_batch_size, attnserve_padding_ratio: _sum/_count deltas). Section 3 sends open "
        "loop, whatever the answers' pace, so a refusal (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is the only way "
        "for the server to shed load; the latency limit of an accepted request is the queue delay plus "
        f"{LATENCY_RUNS} × the mean compute time of one engine run of its bucket over the same window "
        "(attnserve_compute_duration_seconds by seq_bucket, summed over the other labels), checked against its "
        "p99. RSS is the server's process_resident_memory_bytes, read before the overload and every "
        f"{RSS_EVERY_S:g} s during it. Client and servers share this machine's cores: at high offered rates the "
        "client's own sending takes CPU from the server, as a real client on the same host would.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batching_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    p.add_argument("--out", type=Path, default=Path("reports/batching_bench.md"))
    p.add_argument("--rounds", type=int, default=5, help="counted rounds of sections 1 and 2")
    p.add_argument("--round-s", type=float, default=6.0, help="seconds each server runs per round")
    p.add_argument("--overload-s", type=float, default=20.0, help="seconds of overload (section 3)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto", help="both services' provider")
    p.add_argument(
        "--batching-flags",
        default="",
        help='flags added to the batching server, e.g. "--max-queue-wait-ms 100" (a latency-bound queue)',
    )
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, 2 s of overload (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.round_s, args.overload_s = 1, 1.0, 2.0
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"bench.batching_bench: no model at {args.model_dir}; run `make export` first")
    started = time.perf_counter()
    mix_target = mixed_target()
    code = code_version()  # now, as the servers start: they run what is on disk at that moment
    with tempfile.TemporaryDirectory(prefix="batching_bench.") as log_dir:
        print(f"starting {', '.join([*SERVICES, ECHO])} ...", flush=True)
        endpoints = start_endpoints(
            args.model_dir, args.provider, Path(log_dir), tuple(shlex.split(args.batching_flags))
        )
        try:
            meter = CpuMeter([os.getpid(), *(e.process.pid for e in endpoints.values())])
            try:
                mixed = measure_mixed(endpoints, mix_target, args.rounds, args.round_s)
                small = measure_small(endpoints, args.rounds, args.round_s)
            except ServerError as e:
                print(f"bench.batching_bench: {e}", file=sys.stderr)
                return 1
            capacity = mixed.series.merged(BATCHING).throughput_rps
            print(f"  overload at {OVERLOAD_FACTOR:g} × {capacity:.1f} req/s for {args.overload_s:g} s", flush=True)
            over = overload(endpoints[BATCHING], args.model_dir, mix_target, capacity, args.overload_s)
            usage = meter.stop()
        finally:
            stop_endpoints(endpoints)
    text = report(mixed, small, over, endpoints, usage, code, args, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + "\n".join([*mixed_table(mixed, endpoints), "", *small_table(small), "", *overload_tables(over), ""]))
    print("\n".join(check.line() for check in checks(mixed, small, over)))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
