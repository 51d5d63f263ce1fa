"""`make bench-workers`: one service process vs two sharing the gRPC port (--reuse-port, SO_REUSEPORT).

Does a second process on one host pay? Python serves each call on one event loop; on few cores that loop, not
onnxruntime, bounds small requests (bench-batching: 0.29 of an echo server). Two processes give two loops but
split the cores and batch less. The cores are split evenly: N workers each take cores/N intra-op threads and
engine threads. The kernel spreads connections, not calls, so the client opens one channel per caller.

Rounds as in bench-batching (warm-up, then rotated order, one server loaded at a time); the ratio two ÷ one is
taken within a round. Written to reports/workers_bench.md.

    python -m bench.workers_bench --model-dir models/attention [--rounds 3] [--round-s 5] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.harness.provenance import code_version
from bench.harness.rounds import Series, ServerError, measure_rounds, ratio_cells
from bench.harness.servers import start_in_parallel
from bench.harness.workloads import MIX, MIX_CONCURRENCY, SMALL, SMALL_CONCURRENCY, mixed_target
from service.host.cpu_quota import usable_cores
from tests.load.loadgen import LoadConfig
from tests.load.workload import Target, kserve_target
from tests.server_process import ServerProcess, free_port, start_server

WORKERS = (1, 2)


@dataclass
class Workers:
    """N service processes on one gRPC port."""

    processes: list[ServerProcess]
    address: str

    @property
    def process(self) -> subprocess.Popen:  # the first one, for rotated_rounds' error message
        return self.processes[0].process

    def alive(self) -> bool:
        return all(p.process.poll() is None for p in self.processes)

    def stop(self) -> None:
        for p in self.processes:
            p.stop()


def start_workers(model_dir: Path, count: int) -> Workers:
    threads = str(max(1, usable_cores() // count))
    port = str(free_port())
    flags = ("--grpc-port", port, "--reuse-port", "true", "--intra-op-threads", threads, "--engine-workers", threads)
    started = start_in_parallel(
        [str(i) for i in range(count)], lambda _: start_server(model_dir, *flags), ServerProcess.stop
    )
    return Workers(list(started.values()), f"127.0.0.1:{port}")


def measure(servers: dict[str, Workers], target: Target, callers: int, rounds: int, round_s: float) -> Series:
    """The rounds bench-batching runs (bench.harness.rounds), one channel (connection) per caller: the kernel
    spreads connections."""
    config = LoadConfig(
        concurrency=callers, channels=callers, warmup_s=max(round_s, 1.0), max_requests=10**9, duration_s=round_s
    )
    return measure_rounds(servers, dict.fromkeys(servers, target), config, rounds, target.name)


def table(series: Series) -> list[str]:
    lines = [
        "| workers | req/s | p50 ms | p99 ms | ÷ 1 worker: median | min–max | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in series.blocks:
        r = series.merged(name)
        ratio, spread = ratio_cells(series.ratios(name, "1"), reference=name == "1")
        lines.append(
            f"| {name} | {r.throughput_rps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {ratio} | {spread} | {r.count} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    p.add_argument("--out", type=Path, default=Path("reports/workers_bench.md"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-s", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="1 round of 1 s (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.round_s = 1, 1.0
    code = code_version()
    workloads = [
        (f"{SMALL}, c={SMALL_CONCURRENCY}", kserve_target(SMALL), SMALL_CONCURRENCY),
        (f"mixed {MIX}, c={MIX_CONCURRENCY}", mixed_target(), MIX_CONCURRENCY),
    ]
    servers = start_in_parallel(
        [str(n) for n in WORKERS], lambda n: start_workers(args.model_dir, int(n)), Workers.stop
    )
    try:
        sections = [
            (title, measure(servers, target, callers, args.rounds, args.round_s))
            for title, target, callers in workloads
        ]
    except ServerError as e:
        print(f"bench.workers_bench: {e}", file=sys.stderr)
        return 1
    finally:
        for workers in servers.values():
            workers.stop()
    lines = [
        "# One process vs two on one port",
        "",
        f"`python -m bench.workers_bench --rounds {args.rounds} --round-s {args.round_s:g}`, "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {usable_cores()} cores, Python "
        f"{platform.python_version()}, code {code}. N workers: N processes with --reuse-port, each with cores/N "
        "intra-op and engine threads; one channel (connection) per caller.",
    ]
    for title, series in sections:
        lines += ["", f"## KServe {title}", "", *table(series)]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
