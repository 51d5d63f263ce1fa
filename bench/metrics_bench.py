"""`make bench-metrics`: what Prometheus metrics, the JSON access log and OpenTelemetry tracing cost in throughput.

Servers (`python -m service`, one process each): **full** = metrics on, access log all,
**metrics** = metrics on, access log off, **off** = `--metrics false --access-log off`; with tracing (unless
--no-tracing) also **tracing** = `metrics` traced: every request sampled, spans exported over OTLP/HTTP to a sink
(`python -m tests.otlp_receiver`, a process of its own), and **tracing_off** = `metrics` with OTEL_* variables set
but OTEL_SDK_DISABLED=true; both are compared with `metrics` too. One load client in
this process drives KServe ModelInfer at (1,16,512), closed loop, concurrency 8 (the shape where the
per-request overhead weighs most), and optionally attnserve.v1 Attend (--v1). Every round runs each server
for --round-s seconds, in an order rotated round by round, after one warm-up round that is not counted;
only one server is loaded at a time. Each round gives throughput(variant) / throughput(off) from adjacent
measurements; the report has the median and min–max of those ratios, pooled req/s, p50/p99 and server CPU
per request, and the verdict against the 3% limit. Exit 0 whatever the verdict (it is in the report); 1 if
a server erred.

    python -m bench.metrics_bench --model-dir models/attention --out reports/metrics_bench.md [--rounds N]
        [--round-s S] [--v1] [--quick] [--no-tracing]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import onnxruntime as ort

from bench.harness.cpu import CpuMeter, process_cpu_s
from bench.harness.provenance import code_version
from bench.harness.rounds import ServerError, rotated_rounds
from bench.harness.servers import start_in_parallel
from service.host.cpu_quota import usable_cores
from tests.load.loadgen import LoadConfig, LoadResult, run_load
from tests.load.workload import Shape, Target, kserve_target, v1_target
from tests.server_process import ServerProcess, start_server

SHAPE = Shape(1, 16)
CONCURRENCY = 8
LIMIT = 0.03  # the most throughput metrics may cost
BASELINE = "off"
# name -> (extra `python -m service` flags, what it is)
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "full": (("--access-log", "all"), "metrics on, access log all"),
    # The defaults (access log errors only) write no line here: every request succeeds.
    "metrics": (("--access-log", "off"), "metrics on, access log off: the defaults' cost"),
    "off": (("--metrics", "false", "--access-log", "off"), "metrics off, access log off"),
    "tracing": (("--access-log", "off"), "`metrics` + tracing on: 100% sampled, OTLP/HTTP to a local sink"),
    "tracing_off": (("--access-log", "off"), "`metrics` + OTEL_* set, OTEL_SDK_DISABLED=true"),
}
# The tracing variants' OTEL_* variables; {sink} is the sink's OTLP/HTTP endpoint. A short export interval: spans
# leave in batches of a few hundred, as a busy server's would, not 2048 at a time every 5 s.
TRACING_ENV: dict[str, dict[str, str]] = {
    "tracing": {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{sink}", "OTEL_TRACES_SAMPLER": "always_on",
                "OTEL_BSP_SCHEDULE_DELAY": "200"},
    "tracing_off": {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{sink}", "OTEL_TRACES_SAMPLER": "always_on",
                    "OTEL_SDK_DISABLED": "true"},
}  # fmt: skip
TRACING_REFERENCE = "metrics"  # what tracing adds to: the defaults
# --control: a second `off` server, measured like the others. Its ratio to `off` should be 1; how far it is
# shows what this machine's noise alone makes of the ratios in the same run (an A/A test).
CONTROL = "off2"
ALL_VARIANTS = {**VARIANTS, CONTROL: (VARIANTS[BASELINE][0], "the same as off: A/A control")}
# The verdict line, for tests and tools that read the report.
VERDICT_LINE = re.compile(r"`(\w+)` .*metrics on vs off: loss (-?\d+\.\d)% \(limit 3%\) — (PASS|FAIL)")
BLOCK_WARMUP_REQUESTS = 16  # each block opens a fresh channel: its first calls pay for the connection


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    running: ServerProcess
    access_path: Path  # the server's stdout: its access-log lines

    @property
    def process(self) -> subprocess.Popen:
        return self.running.process

    @property
    def address(self) -> str:
        return self.running.address

    def alive(self) -> bool:
        return self.process.poll() is None

    def access_lines(self) -> int:
        with self.access_path.open("rb") as f:
            return sum(1 for _ in f)

    def stop(self) -> None:
        self.running.stop()


def start_variant(model_dir: Path, name: str, log_dir: Path, sink: str = "", timeout_s: float = 120.0) -> Server:
    """`python -m service` with the variant's flags; stdout (the access log) goes to a file, not to a reader
    thread in this process, which would take the GIL from the load client only while `full` runs and bias
    the ratio. A file costs the server the same write(2) per line as the pipe a container runtime reads."""
    access_path = log_dir / f"{name}.access.jsonl"
    flags = ALL_VARIANTS[name][0]
    env = {key: value.format(sink=sink) for key, value in TRACING_ENV.get(name, {}).items()}
    running = start_server(model_dir, *flags, env=env, timeout_s=timeout_s, stdout=access_path)
    return Server(name, running, access_path)


def start_servers(
    model_dir: Path, log_dir: Path, names: Sequence[str] = tuple(VARIANTS), sink: str = ""
) -> dict[str, Server]:
    """One server per variant, started in parallel; none left running if one fails."""
    return start_in_parallel(names, lambda name: start_variant(model_dir, name, log_dir, sink), Server.stop)


class Sink:
    """The OTLP/HTTP receiver the traced server exports to, in a process of its own; counts what arrives."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.otlp_receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.endpoint = f"http://127.0.0.1:{self.process.stdout.readline().split()[1]}/v1/traces"

    def close(self) -> int:
        """Stop it; the number of exports it received."""
        out, _ = self.process.communicate(timeout=30)
        return int(out.split()[-1]) if out.strip() else 0


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Series:
    """One API's rounds: per variant, one LoadResult per counted round (same index = same round)."""

    api: str
    blocks: dict[str, list[LoadResult]]
    orders: list[list[str]]
    # Per variant, per round: (server CPU seconds, requests it answered, warm-up included). A CPU-bound server
    # turns a throughput loss into more CPU per request, so this is a check on the ratios, not a cost model.
    cpu: dict[str, list[tuple[float, int]]]

    def ratios(self, name: str) -> list[float]:
        """throughput(name) / the reference's, round by round. The reference is `off`, or with the A/A control
        the mean of `off` and its twin: two identical servers here differ by a few percent between them
        (which process got which cores, run after run), and a single one would carry that into every ratio.
        The control itself is compared with `off` alone: that ratio is the noise floor."""
        names = (BASELINE,) if name == CONTROL or CONTROL not in self.blocks else (BASELINE, CONTROL)
        out = []
        for index, result in enumerate(self.blocks[name]):
            reference = statistics.fmean(self.blocks[n][index].throughput_rps for n in names)
            out.append(result.throughput_rps / reference if reference > 0 else float("nan"))
        return out

    def merged(self, name: str) -> LoadResult:
        return LoadResult.merge(self.blocks[name])

    def cpu_us_per_request(self, name: str) -> float:
        """Server CPU (all its threads) per answered request, pooled over the rounds."""
        seconds = sum(s for s, _ in self.cpu[name])
        return seconds / max(sum(n for _, n in self.cpu[name]), 1) * 1e6


def measure(servers: dict[str, Server], target: Target, api: str, rounds: int, round_s: float) -> Series:
    """A warm-up round, then `rounds` rounds of every variant for round_s each, in rotated order."""
    names = list(servers)
    series = Series(api, {name: [] for name in names}, [], {name: [] for name in names})
    config = LoadConfig(
        concurrency=CONCURRENCY,
        warmup_requests=BLOCK_WARMUP_REQUESTS,
        warmup_s=max(round_s, 1.0),
        max_requests=10**9,  # bounded by time only
        duration_s=round_s,
    )
    cpu: dict[str, tuple[float, int]] = {}  # the last block's, per server

    def block(name: str) -> LoadResult:
        server = servers[name]
        cpu_before = process_cpu_s(server.process.pid)
        result = run_load(server.address, target, config)
        cpu[name] = (process_cpu_s(server.process.pid) - cpu_before, result.count + BLOCK_WARMUP_REQUESTS)
        return result

    for order, results in rotated_rounds(servers, rounds, api, block):
        series.orders.append(order)
        for name, result in results.items():
            series.blocks[name].append(result)
            series.cpu[name].append(cpu[name])
    return series


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Verdict:
    api: str
    name: str
    loss: float  # 1 − median ratio; negative: faster than off
    loss_min: float
    loss_max: float

    @property
    def passed(self) -> bool:
        return self.loss <= LIMIT

    def line(self) -> str:
        return (
            f"{self.api} `{self.name}` ({ALL_VARIANTS[self.name][1]}): metrics on vs off: loss {self.loss:.1%} "
            f"(limit {LIMIT:.0%}) — {'PASS' if self.passed else 'FAIL'}; per round {self.loss_min:.1%} to "
            f"{self.loss_max:.1%}"
        )


def verdicts(series: Series) -> list[Verdict]:
    out = []
    for name in series.blocks:
        if name in (BASELINE, CONTROL) or name in TRACING_ENV:
            continue
        ratios = series.ratios(name)
        out.append(Verdict(series.api, name, 1 - statistics.median(ratios), 1 - max(ratios), 1 - min(ratios)))
    return out


def tracing_lines(series: Series) -> list[str]:
    """What tracing adds to `metrics` (the same server otherwise): the throughput ratio round by round, and the
    server CPU per request."""
    if TRACING_REFERENCE not in series.blocks:
        return []
    reference = series.blocks[TRACING_REFERENCE]
    lines = []
    for name in (n for n in TRACING_ENV if n in series.blocks):
        ratios = [r.throughput_rps / ref.throughput_rps for r, ref in zip(series.blocks[name], reference, strict=True)]
        cpu = series.cpu_us_per_request(name) - series.cpu_us_per_request(TRACING_REFERENCE)
        lines.append(
            f"{series.api} `{name}` ({ALL_VARIANTS[name][1]}) vs `{TRACING_REFERENCE}`: throughput ratio "
            f"{statistics.median(ratios):.3f} (per round {min(ratios):.3f}–{max(ratios):.3f}), server CPU "
            f"{cpu:+.0f} µs/request"
        )
    return lines


def control_line(series: Series) -> str | None:
    """With --control: the A/A ratio, whose distance from 1 is the noise floor of this run's ratios."""
    if CONTROL not in series.blocks:
        return None
    ratios = series.ratios(CONTROL)
    return (
        f"{series.api} A/A control `{CONTROL}` (identical to `off`): ratio {statistics.median(ratios):.3f}, per "
        f"round {min(ratios):.3f}–{max(ratios):.3f}; losses closer to 0 than |1 − that| are within this run's noise"
    )


def table(series: Series) -> list[str]:
    lines = [
        "| API | variant | settings | req/s | p50 ms | p99 ms | req/s ÷ reference: median | spread (min–max) | "
        "server CPU µs/req | Δ vs off | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    off_cpu = series.cpu_us_per_request(BASELINE)
    for name in series.blocks:
        settings = ALL_VARIANTS[name][1]
        merged, ratios = series.merged(name), series.ratios(name)
        ratio = "1 (reference)" if name == BASELINE else f"{statistics.median(ratios):.3f}"
        spread = "–" if name == BASELINE else f"{min(ratios):.3f}–{max(ratios):.3f}"
        cpu = series.cpu_us_per_request(name)
        delta = "–" if name == BASELINE else f"{cpu - off_cpu:+.0f}"
        lines.append(
            f"| {series.api} | {name} | {settings} | {merged.throughput_rps:.0f} | {merged.p50_ms:.2f} | "
            f"{merged.p99_ms:.2f} | {ratio} | {spread} | {cpu:.0f} | {delta} | {merged.count} |"
        )
    return lines


def report(
    all_series: list[Series],
    usage: dict[str, float],
    access: dict[str, int],
    code: str,
    args: argparse.Namespace,
    wall_s: float,
    exports: int = 0,
) -> str:
    cores = usable_cores()
    flags = "".join(f" --{flag}" for flag in ("v1", "control", "quick") if getattr(args, flag))
    flags += "" if args.tracing else " --no-tracing"
    lines = [
        "# Metrics overhead benchmark",
        "",
        f"`python -m bench.metrics_bench --rounds {args.rounds} --round-s {args.round_s:g}{flags}`, "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, on "
        f"{platform.processor() or platform.machine()}, {cores} cores; onnxruntime {ort.__version__}, grpcio "
        f"{grpc.__version__}, Python {platform.python_version()}; model `{args.model_dir}`; code {code}. Whole "
        f"run {wall_s:.0f} s; other processes used {usage['others_cpu_fraction']:.0%} of the machine meanwhile.",
        "",
        f"Load: {SHAPE}, closed loop, concurrency {CONCURRENCY}, one channel; {args.rounds} counted rounds of "
        f"{args.round_s:g} s per variant after one warm-up round. Access-log lines written by the servers: "
        + ", ".join(f"{name} {n}" for name, n in access.items())
        + " (stdout to a file)."
        + (f" OTLP exports the sink received: {exports}." if args.tracing else ""),
        "",
    ]
    for series in all_series:
        lines += [*table(series), ""]
    lines += ["## Verdict", ""]
    lines += [f"- {v.line()}" for series in all_series for v in verdicts(series)]
    lines += [f"- {line}" for series in all_series for line in tracing_lines(series)]
    lines += [f"- {line}" for series in all_series if (line := control_line(series))]
    lines += [
        "",
        "## Method",
        "",
        "Every round runs each server in turn for the round's length, the order rotated round by round and a "
        "first warm-up round not counted, with only the measured server under load; a variant's ratio for a round"
        " is its throughput over the reference's in that same round (`off`, or with the A/A control the mean of "
        "`off` and `off2`: identical servers differ by a few percent here), so machine noise slower than a round "
        "cancels out, and the table gives the median ratio and its min–max over rounds (req/s, p50 and p99 pooled"
        " over all rounds). Loss = 1 − median ratio; the limit is 3%. *Server CPU µs/req*: the server process's "
        "CPU time (all threads, /proc) over the requests it answered, pooled over rounds (ORT's compute "
        "included). On a machine where client and server share few cores the server uses about all the CPU it "
        "gets, so its difference from `off` largely mirrors the throughput loss rather than measuring the per-"
        "request cost separately; time the calls in-process for that.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    p.add_argument("--out", type=Path, default=Path("reports/metrics_bench.md"))
    p.add_argument("--rounds", type=int, default=16, help="more rounds, a tighter median: ±5%% noise per round here")
    p.add_argument("--round-s", type=float, default=3.0, help="seconds each variant runs per round")
    p.add_argument("--v1", action="store_true", help="also measure attnserve.v1 Attend (doubles the run)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="an A/A control: a second `off` server, whose ratio to `off` is the noise floor")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="2 rounds of 0.5 s (tests)")
    p.add_argument("--tracing", action=argparse.BooleanOptionalAction, default=True,
                   help="the tracing variants (and the OTLP sink they export to)")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.round_s = 2, 0.5
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"bench.metrics_bench: no model at {args.model_dir}; run `make export` first")
    started = time.perf_counter()
    targets = [("kserve", kserve_target(SHAPE))] + ([("v1", v1_target(SHAPE))] if args.v1 else [])
    code = code_version()  # now, as the servers start: they run what is on disk at that moment
    with tempfile.TemporaryDirectory(prefix="metrics_bench.") as log_dir:
        names = [name for name in VARIANTS if args.tracing or name not in TRACING_ENV]
        names += [CONTROL] if args.control else []
        sink = Sink() if args.tracing else None
        print(f"starting {', '.join(names)} ...", flush=True)
        try:
            servers = start_servers(args.model_dir, Path(log_dir), names, sink.endpoint if sink else "")
        except BaseException:
            if sink is not None:
                sink.close()
            raise
        try:
            meter = CpuMeter([os.getpid(), *(s.process.pid for s in servers.values())])
            all_series = [measure(servers, target, api, args.rounds, args.round_s) for api, target in targets]
            usage = meter.stop()
        except ServerError as e:
            print(f"bench.metrics_bench: {e}", file=sys.stderr)
            return 1
        finally:
            for server in servers.values():
                server.stop()
            exports = sink.close() if sink is not None else 0  # after the servers: they export at exit too
        # Counted once the servers have stopped: a server may buffer its access lines until it exits.
        access = {name: server.access_lines() for name, server in servers.items()}
    text = report(all_series, usage, access, code, args, time.perf_counter() - started, exports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    for series in all_series:
        print("\n".join(table(series)))
    for series in all_series:
        for v in verdicts(series):
            print(v.line())
        for line in tracing_lines(series):
            print(line)
        if line := control_line(series):
            print(line)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
