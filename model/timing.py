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


def cpu_session(model: Path | str | bytes, threads: int) -> ort.InferenceSession:
    """A CPU session on a model file or serialized ModelProto, with the thread count fixed."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-node warnings in CLI output
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(runners: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each runner, measured in blocks that take turns round after round.

    Blocks, not single calls: onnxruntime's and torch's thread pools spin for a while after a call,
    and a call squeezed between another runtime's calls would pay for that runtime's spinning.
    """
    block_s = budget_s / max(rounds, 1) / max(len(runners), 1)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(rounds + 1):  # round 0 warms up and is dropped
        for name, run in runners.items():
            block: list[float] = []
            started = time.perf_counter()
            while not block or (time.perf_counter() - started < block_s and len(block) < 200):
                block.append(timed(run))
            if round_:
                times[name].append(statistics.median(block))
            time.sleep(0.05)  # let the pool that just ran go idle before the next one starts
    return {name: statistics.median(t) for name, t in times.items()}


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
