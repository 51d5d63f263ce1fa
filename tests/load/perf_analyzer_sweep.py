"""`make perf-analyzer`: Triton's perf_analyzer against the KServe v2 API over sequence lengths and concurrency.

    python -m tests.load.perf_analyzer_sweep [--url HOST:PORT] [--seq-lens 16,128,512,2048] [--concurrency 1,2,4,8]

Without --url it starts the service itself (`python -m service`, on free ports) on --model-dir. perf_analyzer
writes one CSV per sequence length (rows: concurrency levels) under --out; a summary table goes beside them.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.server_process import start_server
from tests.triton_tools import (
    perf_analyzer_available,
    perf_analyzer_command,
    perf_analyzer_env,
    write_perf_analyzer_data,
)

D_MODEL = 512


def run_level(url: str, data: Path, concurrency: int, window_ms: int, csv_path: Path) -> dict[str, str]:
    """One perf_analyzer measurement at one concurrency; its CSV row."""
    argv = [
        *perf_analyzer_command(), "-m", "attention", "-i", "grpc", "-u", url, "--input-data", str(data),
        "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "time_windows",
        "-p", str(window_ms), "--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv_path),
    ]  # fmt: skip
    done = subprocess.run(argv, env=perf_analyzer_env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    (row,) = csv.DictReader(csv_path.open())
    return row


def sweep(url: str, seq_lens: list[int], levels: list[int], window_ms: int, out: Path) -> list[dict[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for seq in seq_lens:
            data = Path(scratch) / f"hs{seq}.json"
            write_perf_analyzer_data(data, seq, D_MODEL)
            rows = []
            for level in levels:
                row = run_level(url, data, level, window_ms, Path(scratch) / f"{seq}_{level}.csv")
                rows.append(row)
                summary.append({"seq": str(seq), **row})
                print(f"seq {seq:5d}  c {level:2d}  {float(row['Inferences/Second']):9.1f} infer/s  "
                      f"p50 {int(row['p50 latency']) / 1e3:8.2f} ms  p99 {int(row['p99 latency']) / 1e3:8.2f} ms",
                      flush=True)  # fmt: skip
            with (out / f"attention_seq{seq}.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return summary


def write_summary(summary: list[dict[str, str]], path: Path, command: str) -> None:
    lines = [
        "# perf_analyzer sweep (KServe v2 gRPC, model `attention`)",
        "",
        f"`{command}`. Batch 1, FP32, no mask; latencies are perf_analyzer's client-side figures; server columns",
        "come from our ModelStatistics. One CSV per sequence length beside this file.",
        "",
        "| seq | concurrency | infer/s | p50 ms | p99 ms | server queue µs | server compute µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['seq']} | {row['Concurrency']} | {float(row['Inferences/Second']):.1f} | "
            f"{int(row['p50 latency']) / 1e3:.2f} | {int(row['p99 latency']) / 1e3:.2f} | "
            f"{row.get('Server Queue', '')} | {row.get('Server Compute Infer', '')} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.perf_analyzer_sweep", description=__doc__)
    parser.add_argument("--url", help="a running server's HOST:PORT; default: start one")
    parser.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    parser.add_argument("--seq-lens", default="16,128,512,2048")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    parser.add_argument("--out", type=Path, default=Path("reports/perf_analyzer"))
    args = parser.parse_args(argv)
    available, why = perf_analyzer_available()
    if not available:
        print(f"perf_analyzer cannot run: {why}", file=sys.stderr)
        return 1
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    server = None if args.url else start_server(args.model_dir)
    try:
        url = args.url or server.address  # type: ignore[union-attr]
        summary = sweep(url, seq_lens, levels, args.window_ms, args.out)
    finally:
        if server is not None:
            server.stop()
    command = "make perf-analyzer" if argv is None else "python -m tests.load.perf_analyzer_sweep " + " ".join(argv)
    write_summary(summary, args.out / "summary.md", command)
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
