"""Rounds of load: every server in turn, the order rotated round by round after a warm-up round, so that a
ratio between two servers comes from adjacent measurements and machine noise slower than a round cancels out."""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tests.load.loadgen import LoadConfig, LoadResult, run_load
from tests.load.workload import Target


class ServerError(RuntimeError):
    """A server answered with an error or exited mid-run: the numbers mean nothing."""


class Loaded(Protocol):
    """A bench server as the rounds see it."""

    process: subprocess.Popen

    def alive(self) -> bool: ...


class Reachable(Loaded, Protocol):
    """A server under load at one address (an Endpoint, or bench-workers' processes sharing a port)."""

    address: str


def rotated(names: Sequence[str], round_: int) -> list[str]:
    """Round r starts with the (r mod n)th variant, so each one goes first, second, … equally often."""
    k = round_ % len(names)
    return [*names[k:], *names[:k]]


def rotated_rounds(
    servers: Mapping[str, Loaded], rounds: int, label: str, block: Callable[[str], LoadResult]
) -> Iterator[tuple[list[str], dict[str, LoadResult]]]:
    """A warm-up round, then `rounds` counted rounds, each running block(name) once per server in rotated order
    (only that server under load); yields (order, results) for the counted ones. Raises ServerError when a
    block erred or its server is gone: nothing here should fail."""
    names = list(servers)
    for round_ in range(-1, rounds):  # round -1: the warm-up, not counted
        order = rotated(names, round_ + 1)
        results: dict[str, LoadResult] = {}
        for name in order:
            server = servers[name]
            result = block(name)
            if result.errors or not server.alive():
                raise ServerError(f"{name} ({label}): errors {result.errors}, exit {server.process.poll()}")
            results[name] = result
            time.sleep(0.05)  # let the last server's threads go idle before the next one is loaded
        tag = "warm-up" if round_ < 0 else f"round {round_ + 1}/{rounds}"
        rates = "  ".join(f"{name} {results[name].throughput_rps:7.0f}" for name in order)
        print(f"  {label} {tag:<12} req/s: {rates}", flush=True)
        if round_ >= 0:
            yield order, results


@dataclass
class Series:
    """One section's rounds: per server, one LoadResult per counted round (same index = same round)."""

    blocks: dict[str, list[LoadResult]]

    def ratios(self, name: str, reference: str) -> list[float]:
        """throughput(name) / throughput(reference), round by round."""
        return [
            a.throughput_rps / b.throughput_rps if b.throughput_rps > 0 else math.nan
            for a, b in zip(self.blocks[name], self.blocks[reference], strict=True)
        ]

    def merged(self, name: str) -> LoadResult:
        return LoadResult.merge(self.blocks[name])


def measure_rounds(
    endpoints: Mapping[str, Reachable], targets: dict[str, Target], config: LoadConfig, rounds: int, label: str
) -> Series:
    """A warm-up round, then `rounds` rounds of every server in targets, in rotated order; raises ServerError on
    any error or a server gone (nothing here should fail)."""
    series = Series({name: [] for name in targets})

    def block(name: str) -> LoadResult:
        return run_load(endpoints[name].address, targets[name], config)

    for _, results in rotated_rounds({name: endpoints[name] for name in targets}, rounds, label, block):
        for name, result in results.items():
            series.blocks[name].append(result)
    return series


def ratio_cells(ratios: Sequence[float], reference: bool) -> tuple[str, str]:
    """The median and min–max table cells of a server's per-round ratios."""
    if reference:
        return "1 (reference)", "–"
    return f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}–{max(ratios):.2f}"
