"""`make report-latency`: latency against sequence length as the service's own histograms show it.

    python -m tests.load.latency_report --model-dir models/attention --out reports/latency_vs_seqlen.md
    python -m tests.load.latency_report --address 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics

Sends one length per sequence bucket (the bucket bounds: 16, 64, 256, 1024, 4096 by default), one request
at a time, so the figures are service time without queueing; scrapes /metrics before and after and
computes p50/p90/p99 per seq_bucket from the difference of `attnserve_request_duration_seconds` exactly as
Prometheus' histogram_quantile does, so the report shows what the dashboards show (with their bucket
resolution; the client's own timings sit beside them). Fits latency ∝ n^k to the p50s (log-log least
squares) and writes a markdown report and a log-log PNG with the fit.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.seq_buckets import DEFAULT_SEQ_BUCKETS, seq_bucket
from tests.load.histograms import count, histograms, quantile, scrape, subtract
from tests.load.loadgen import LoadConfig, LoadResult, run_load
from tests.load.plots import log_log, pyplot, save
from tests.load.workload import APIS, LengthMix, build_target
from tests.server_process import start_server

REQUEST_HISTOGRAM = "attnserve_request_duration_seconds"
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Row:
    seq: int
    bucket: str
    observed: float  # requests the histogram counted in this bucket during the sweep
    server_ms: dict[float, float]  # quantile -> ms, from the histogram
    client: LoadResult


def sweep(address: str, metrics_url: str, api: str, lengths: tuple[int, ...], seconds: float,
          min_requests: int, d_model: int = 512) -> list[Row]:  # fmt: skip
    """Closed loop at concurrency 1 per length, for `seconds` and at least `min_requests` answers."""
    before = histograms(scrape(metrics_url), REQUEST_HISTOGRAM, "seq_bucket", {"code": "OK"})
    results = {}
    for seq in lengths:
        target = build_target(api, LengthMix.fixed(seq), d_model=d_model)
        warm = run_load(address, target, LoadConfig(warmup_requests=0, max_requests=3, duration_s=60.0))
        duration = max(seconds, min_requests * warm.p50_ms / 1e3 * 1.2)  # long sequences: enough answers
        config = LoadConfig(warmup_requests=0, duration_s=duration, max_requests=100_000, timeout_s=300.0)
        results[seq] = run_load(address, target, config)
        print(f"  {results[seq].summary()}", flush=True)
    after = histograms(scrape(metrics_url), REQUEST_HISTOGRAM, "seq_bucket", {"code": "OK"})
    seen = subtract(after, before)
    rows = []
    for seq, client in results.items():
        bucket = seq_bucket(seq)
        buckets = seen.get(bucket, {})
        server = {q: quantile(q, buckets) * 1e3 if buckets else math.nan for q in QUANTILES}
        rows.append(Row(seq, bucket, count(buckets), server, client))
    return rows


@dataclass(frozen=True)
class PowerFit:
    """latency ≈ scale · n^exponent over the lengths [low, high]: least squares in log-log."""

    exponent: float
    scale: float
    low: int
    high: int

    def at(self, n: float) -> float:
        return self.scale * n**self.exponent


def fit_power(seqs: list[int], ms: list[float]) -> PowerFit | None:
    keep = [(s, m) for s, m in zip(seqs, ms, strict=True) if m > 0 and math.isfinite(m)]
    if len(keep) < 2:
        return None
    x, y = np.log([s for s, _ in keep]), np.log([m for _, m in keep])
    slope, intercept = np.polyfit(x, y, 1)
    return PowerFit(float(slope), float(math.exp(intercept)), keep[0][0], keep[-1][0])


def markdown(rows: list[Row], api: str, png: str, fits: dict[str, PowerFit]) -> str:
    lines = [
        "# Latency against sequence length",
        "",
        f"`make report-latency`, {datetime.date.today()}, {api} API, batch 1, concurrency 1 (no queueing). Server "
        'columns: `attnserve_request_duration_seconds{code="OK"}` scraped before and after, quantiles as '
        "Prometheus' histogram_quantile computes them (linear within a bucket, so as coarse as the buckets); "
        "client columns: the load generator's own timings of the same calls.",
        "",
        "| seq | seq_bucket | n (histogram) | p50 ms | p90 ms | p99 ms | client p50 ms | client p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.server_ms
        lines.append(
            f"| {r.seq} | {r.bucket} | {r.observed:.0f} | {s[0.5]:.2f} | {s[0.9]:.2f} | {s[0.99]:.2f} | "
            f"{r.client.p50_ms:.2f} | {r.client.p99_ms:.2f} |"
        )
    found = "; ".join(f"{name}: latency ∝ n^{fit.exponent:.2f}" for name, fit in fits.items())
    lines += [
        "",
        f"Fitted growth of the p50 (log-log least squares): {found}. Attention's cost is O(n²·d): short sequences "
        "are dominated by per-call costs and the projections (linear in n), long ones by the n² score matrix, "
        "so the exponent rises towards 2 with length.",
        "",
        f"![p50/p90/p99 against sequence length, log-log]({png})",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, fits: dict[str, PowerFit], title: str) -> None:
    seqs = [r.seq for r in rows]
    fig, ax = pyplot().subplots(figsize=(7.5, 5))
    for q, marker in zip(QUANTILES, "os^", strict=True):
        ax.plot(seqs, [r.server_ms[q] for r in rows], marker=marker, label=f"p{round(q * 100)} (service histogram)")
    ax.plot(seqs, [r.client.p50_ms for r in rows], "k:", marker=".", label="p50 (client)")
    for (name, fit), style in zip(fits.items(), ("--", "-."), strict=False):
        xs = [s for s in seqs if fit.low <= s <= fit.high]
        ax.plot(xs, [fit.at(s) for s in xs], style, color="grey", label=f"p50 fit, {name}: ∝ n^{fit.exponent:.2f}")
    log_log(ax, seqs, xlabel="sequence length (tokens)", ylabel="ms", title=title)
    ax.legend(fontsize="small")
    save(fig, path)


def write_report(rows: list[Row], out: Path, api: str) -> list[Path]:
    seqs = [r.seq for r in rows]
    p50 = [r.server_ms[0.5] for r in rows]
    candidates = {
        "all lengths": fit_power(seqs, p50),
        "n ≥ 256": fit_power([s for s in seqs if s >= 256], [m for s, m in zip(seqs, p50, strict=True) if s >= 256]),
    }
    fits = {name: fit for name, fit in candidates.items() if fit is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(rows, png, fits, f"attnserve latency against sequence length ({api}, batch 1)")
    out.write_text(markdown(rows, api, png.name, fits))
    return [out, png]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.latency_report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--address", default=None, help="a running service; default: start one on --model-dir")
    parser.add_argument("--metrics-url", default=None, help="its /metrics (default: 127.0.0.1:<metrics port>)")
    parser.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    parser.add_argument("--out", type=Path, default=Path("reports/latency_vs_seqlen.md"))
    parser.add_argument("--api", choices=sorted(APIS), default="kserve")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_SEQ_BUCKETS)),
                        help="one per seq_bucket: the service's bucket bounds")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0, help="load per length")
    parser.add_argument("--min-requests", type=int, default=20, help="answers per length, at least")
    args = parser.parse_args(argv)
    lengths = tuple(int(s) for s in args.lengths.split(","))
    if len({seq_bucket(s) for s in lengths}) != len(lengths):
        parser.error(f"--lengths {args.lengths}: give one length per seq_bucket ({DEFAULT_SEQ_BUCKETS})")
    if args.address and not args.metrics_url:
        parser.error("--address needs --metrics-url")
    server = None if args.address else start_server(args.model_dir)
    address = args.address or server.address
    metrics_url = args.metrics_url or f"http://127.0.0.1:{server.metrics_port}/metrics"
    try:
        rows = sweep(address, metrics_url, args.api, lengths, args.seconds, args.min_requests)
    finally:
        if server is not None:
            server.stop()
    written = write_report(rows, args.out, args.api)
    print(args.out.read_text())
    print("wrote " + ", ".join(map(str, written)))
    return 0 if all(r.client.error_count == 0 and r.observed > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
