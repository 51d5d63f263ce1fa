"""Timing of onnxruntime sessions, shared by export calibration and the benchmarks."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort


def cpu_threads() -> int:
    """Cores this process may use: what the service gives onnxruntime's intra-op pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_session(path: Path | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-node warnings in CLI output
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_seconds(
    run: Callable[[], object], *, min_runs: int = 3, min_seconds: float = 0.3, max_runs: int = 200
) -> float:
    """Median wall time of ``run`` after one warm-up; repeats until both minimums are met."""
    run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < min_seconds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def session_feed(
    session: ort.InferenceSession, batch: int, seq: int, d_model: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random hidden states, and an all-ones mask when the graph takes one."""
    rng = np.random.default_rng(seed)
    feed = {"hidden_states": rng.standard_normal((batch, seq, d_model), dtype=np.float32)}
    if any(i.name == "attention_mask" for i in session.get_inputs()):
        feed["attention_mask"] = np.ones((batch, seq), np.int32)
    return feed


def attention_flops(batch: int, seq: int, d_model: int) -> int:
    """4 projections (8·B·L·d²) plus Q·Kᵀ and A·V (4·B·L²·d)."""
    return 8 * batch * seq * d_model**2 + 4 * batch * seq**2 * d_model
