"""`make load`: latency and throughput over sequence lengths × concurrency, as a table and two plots.

    python -m tests.load.sweep --model-dir models/attention --out reports/load
    python -m tests.load.sweep --address 127.0.0.1:8001 --lengths 16,512 --concurrency 1,8 --seconds 3

Starts the service (or uses --address), then for every (length, concurrency) runs the load generator in
closed loop (a warm-up round of one request per caller, then `seconds` of load, every answer's first one
checked) and writes to --out: load.md (the table, and the headline p99 at 16/512/4096 × concurrency 1/8),
load.json (every result, per-bucket figures included), latency_vs_seq.png (p50 and p99 against sequence
length, one line per concurrency) and throughput_vs_concurrency.png (requests/s and tokens/s against
concurrency, one line per length).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service.host.cpu_quota import usable_cores
from tests.load.loadgen import LoadConfig, LoadResult, run_load
from tests.load.plots import log_log, pyplot, save
from tests.load.workload import APIS, LengthMix, build_target
from tests.server_process import start_server

LENGTHS = (16, 64, 256, 512, 1024, 2048, 4096)
CONCURRENCY = (1, 2, 4, 8, 16, 32)
HEADLINE_LENGTHS = (16, 512, 4096)
HEADLINE_CONCURRENCY = (1, 8)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


@dataclass(frozen=True)
class Point:
    seq: int
    concurrency: int
    result: LoadResult


def measure(address: str, api: str, lengths: tuple[int, ...], concurrency: tuple[int, ...], seconds: float,
            max_requests: int, d_model: int) -> list[Point]:  # fmt: skip
    points = []
    for seq in lengths:
        target = build_target(api, LengthMix.fixed(seq), d_model=d_model)
        for c in concurrency:
            config = LoadConfig(concurrency=c, warmup_requests=c, warmup_s=seconds, duration_s=seconds,
                                max_requests=max_requests, timeout_s=600.0)  # fmt: skip
            result = run_load(address, target, config)
            print(f"  seq {seq:>5}  {result.summary()}", flush=True)
            points.append(Point(seq, c, result))
    return points


def model_info(address: str) -> v1_pb.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return v1_grpc.AttentionServiceStub(channel).GetModelInfo(v1_pb.GetModelInfoRequest(), timeout=30)


def markdown(points: list[Point], info: v1_pb.ModelInfo, api: str, seconds: float) -> str:
    lines = [
        f"# Load sweep ({api} API, model `{info.name}`)",
        "",
        f"`make load`, {datetime.date.today()}: {platform.machine()}, {usable_cores()} cores, provider "
        f"{info.provider}, d_model {info.d_model}, {info.num_heads} heads, batch 1, FP32, no mask. Closed loop: "
        f"each caller sends its next request when its last is answered, for {seconds:g} s per row after a "
        "warm-up round. Latency is the client's, around each call; `n` is how many answers a row's "
        "percentiles rest on. Plots beside this file.",
        "",
        "## Headline: p99 latency (ms)",
        "",
    ]
    by_key = {(p.seq, p.concurrency): p.result for p in points}
    heads = [c for c in HEADLINE_CONCURRENCY if any(k[1] == c for k in by_key)]
    lines += ["| seq | " + " | ".join(f"c={c}" for c in heads) + " |", "|---|" + "---|" * len(heads)]
    for seq in HEADLINE_LENGTHS:
        if any(k[0] == seq for k in by_key):
            cells = [f"{by_key[(seq, c)].p99_ms:.1f}" if (seq, c) in by_key else "–" for c in heads]
            lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every point",
        "",
        "| seq | concurrency | n | req/s | tokens/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        r = p.result
        errors = ", ".join(f"{code} {n}" for code, n in sorted(r.errors.items())) or "0"
        lines.append(
            f"| {p.seq} | {p.concurrency} | {r.count} | {r.throughput_rps:.1f} | {r.tokens_per_s:,.0f} | "
            f"{r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.2f} | {errors} |"
        )
    lines += ["", "![latency against sequence length](latency_vs_seq.png)", "",
              "![throughput against concurrency](throughput_vs_concurrency.png)", ""]  # fmt: skip
    return "\n".join(lines)


def plot(points: list[Point], out: Path, title: str) -> list[Path]:
    """latency_vs_seq.png and throughput_vs_concurrency.png in `out`."""
    plt = pyplot()
    lengths = sorted({p.seq for p in points})
    levels = sorted({p.concurrency for p in points})
    at = {(p.seq, p.concurrency): p.result for p in points}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, stat in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        for c in levels:
            xs = [s for s in lengths if (s, c) in at and at[(s, c)].count]
            ax.plot(xs, [getattr(at[(s, c)], stat) for s in xs], marker="o", label=f"c={c}")
        log_log(ax, lengths, xlabel="sequence length (tokens)", title=stat.replace("_ms", " latency"))
    axes[0].set_ylabel("ms (client side)")
    axes[1].legend(title="concurrency", fontsize="small")
    fig.suptitle(title)
    latency = save(fig, out / "latency_vs_seq.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, stat, label in zip(axes, ("throughput_rps", "tokens_per_s"), ("requests/s", "tokens/s"), strict=True):
        for s in lengths:
            xs = [c for c in levels if (s, c) in at]
            ax.plot(xs, [getattr(at[(s, c)], stat) for c in xs], marker="o", label=f"seq {s}")
        log_log(ax, levels, xlabel="concurrency (callers)", ylabel=label, title=label)
    axes[1].legend(title="length", fontsize="small")
    fig.suptitle(title)
    throughput = save(fig, out / "throughput_vs_concurrency.png")
    return [latency, throughput]


def write_report(points: list[Point], out: Path, info: v1_pb.ModelInfo, api: str, seconds: float) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "load.md"
    report.write_text(markdown(points, info, api, seconds))
    raw = out / "load.json"
    raw.write_text(json.dumps([{"seq": p.seq, "concurrency": p.concurrency, **p.result.to_dict()} for p in points],
                              indent=1) + "\n")  # fmt: skip
    title = f"attnserve {api} API, {info.provider} provider, {usable_cores()} cores, batch 1, closed loop"
    return [report, raw, *plot(points, out, title)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    parser.add_argument("--address", default=None, help="a running server; default: start one on --model-dir")
    parser.add_argument("--out", type=Path, default=Path("reports/load"))
    parser.add_argument("--api", choices=sorted(APIS), default="kserve")
    parser.add_argument("--lengths", type=_ints, default=LENGTHS)
    parser.add_argument("--concurrency", type=_ints, default=CONCURRENCY)
    parser.add_argument("--seconds", type=float, default=5.0, help="load per point, after a warm-up round")
    parser.add_argument("--max-requests", type=int, default=5000, help="most requests per point")
    args = parser.parse_args(argv)
    server = None if args.address else start_server(args.model_dir)
    address = args.address or server.address
    try:
        info = model_info(address)
        print(f"load sweep: {len(args.lengths)} lengths × {len(args.concurrency)} concurrency levels", flush=True)
        points = measure(address, args.api, args.lengths, args.concurrency, args.seconds, args.max_requests,
                         info.d_model)  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    written = write_report(points, args.out, info, args.api, args.seconds)
    print("wrote " + ", ".join(map(str, written)))
    errors = sum(p.result.error_count for p in points)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
