"""Choose the fastest graph form per sequence-length range by measuring them on this machine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from model.timing import cpu_session, interleaved_medians, session_feed

CALIBRATION_SEQ_LENS = (16, 64, 128, 512, 1024, 2048, 4096)


def calibration_points(max_seq_len: int) -> list[int]:
    points = [s for s in CALIBRATION_SEQ_LENS if s < max_seq_len]
    return [*points, max_seq_len]


def measure_forms(
    graphs: dict[str, Path], d_model: int, seq_lens: list[int], threads: int
) -> dict[str, dict[int, float]]:
    """Median ms of each graph at batch 1 for each seq length, the forms taking turns (as the benchmark does)."""
    sessions = {form: cpu_session(path, threads) for form, path in graphs.items()}
    timings: dict[str, dict[int, float]] = {form: {} for form in graphs}
    for seq in seq_lens:
        runners: dict[str, Callable[[], object]] = {}
        for form, session in sessions.items():
            feed = session_feed(session, 1, seq, d_model)
            runners[form] = functools.partial(session.run, None, feed)
        for form, seconds in interleaved_medians(runners, rounds=3, budget_s=1.0).items():
            timings[form][seq] = 1e3 * seconds
    return timings


# A form keeps the next range unless another is clearly faster there: no flapping on noise.
SWITCH_MARGIN = 1.03


def routing_from_timings(timings: dict[str, dict[int, float]]) -> list[dict[str, object]]:
    """[{"up_to": seq, "graph": form}, ...]: the form fastest at the next measured point ≥ seq."""
    seq_lens = sorted(next(iter(timings.values())))
    table: list[dict[str, object]] = []
    for seq in seq_lens:
        fastest = min(timings, key=lambda form: timings[form][seq])
        if table and timings[str(table[-1]["graph"])][seq] <= SWITCH_MARGIN * timings[fastest][seq]:
            fastest = str(table[-1]["graph"])
        if table and table[-1]["graph"] == fastest:
            table[-1]["up_to"] = seq
        else:
            table.append({"up_to": seq, "graph": fastest})
    return table


def static_routing(form: str, max_seq_len: int) -> list[dict[str, object]]:
    return [{"up_to": max_seq_len, "graph": form}]


def route(table: list[dict[str, object]], seq: int) -> str:
    """The graph a routing table names for ``seq`` (the last range takes anything longer)."""
    for entry in table:
        if seq <= int(str(entry["up_to"])):
            return str(entry["graph"])
    return str(table[-1]["graph"])
