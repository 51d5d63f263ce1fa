"""`make soak`: about half of capacity for a long while; memory must stay flat and no request may fail.

    python -m tests.load.soak [--model-dir models/attention] [--minutes 10] [--shape 1,128,512]

Starts the service, measures its capacity (closed loop, concurrency 4), then sends requests open-loop
(Poisson arrivals) at half of it: a warm-up phase, then the soak. The server's RSS is read from /proc after
warm-up and every few seconds; the soak passes when RSS grows by at most 5% over the after-warm-up value and
every request was answered OK. Prints one line, exits 0 (pass) or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace
from pathlib import Path

from tests.load.loadgen import LoadConfig, run_load_async
from tests.load.workload import Shape, kserve_target
from tests.server_process import start_server

MAX_RSS_GROWTH = 0.05


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def soak(address: str, pid: int, shape: Shape, minutes: float, warmup_s: float, sample_s: float) -> dict:
    target = kserve_target(shape)
    capacity = await run_load_async(address, target, LoadConfig(concurrency=4, duration_s=5.0, max_requests=10**6))
    rate = max(capacity.throughput_rps / 2, 1.0)
    half = LoadConfig(rate_rps=rate, poisson=True, warmup_requests=0, max_requests=10**9, timeout_s=30.0)
    warm = await run_load_async(address, target, replace(half, duration_s=warmup_s))
    baseline_rss = rss_bytes(pid)
    samples = [baseline_rss]
    run = asyncio.create_task(run_load_async(address, target, replace(half, duration_s=minutes * 60, seed=1)))
    while not run.done():
        await asyncio.wait({run}, timeout=sample_s)
        samples.append(rss_bytes(pid))
    return {
        "capacity_rps": capacity.throughput_rps,
        "rate_rps": rate,
        "warmup_errors": warm.errors,
        "result": run.result(),
        "rss_after_warmup": baseline_rss,
        "rss_max": max(samples),
        "growth": max(samples) / baseline_rss - 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="how often RSS is read")
    parser.add_argument("--shape", type=Shape.parse, default=Shape(1, 128, 512), help="batch,seq,d_model")
    args = parser.parse_args(argv)
    server = start_server(args.model_dir)
    try:
        started = time.monotonic()
        out = asyncio.run(
            soak(server.address, server.process.pid, args.shape, args.minutes, args.warmup_s, args.sample_s)
        )
    finally:
        server.stop()
    result = out["result"]
    errors = result.error_count + sum(out["warmup_errors"].values())
    passed = errors == 0 and result.count > 0 and out["growth"] <= MAX_RSS_GROWTH
    print(
        f"soak {'PASS' if passed else 'FAIL'}: {time.monotonic() - started:.0f} s at {out['rate_rps']:.1f} req/s "
        f"(capacity {out['capacity_rps']:.1f}), {result.count} answered, {errors} errors"
        f"{' ' + str(dict(result.errors)) if result.errors else ''}, "
        f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, RSS "
        f"{out['rss_after_warmup'] / 2**20:.0f} -> max {out['rss_max'] / 2**20:.0f} MiB "
        f"({out['growth']:+.1%}, limit +{MAX_RSS_GROWTH:.0%})"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
