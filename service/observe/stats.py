"""Per-model counters behind the KServe v2 ModelStatistics rpc (Triton's extension), in nanoseconds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.core.types import Timing


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """Updated only from the event loop thread, so plain integers suffice."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    # Triton's three compute phases; perf_analyzer requires their counts to be equal.
    compute_input: Duration = field(default_factory=Duration)  # checking the request's values
    compute_infer: Duration = field(default_factory=Duration)  # the onnxruntime run
    compute_output: Duration = field(default_factory=Duration)  # casting the output, cutting out weights
    inference_count: int = 0  # sequences answered
    execution_count: int = 0  # engine runs
    last_inference_ms: int = 0  # wall clock, ms since the epoch
    compute_by_batch: dict[int, Duration] = field(default_factory=dict)  # batch size -> engine runs of that size

    def record_success(self, sequences: int, timing: Timing, input_s: float, output_s: float) -> None:
        self.success.add(timing.total_s)
        self.queue.add(timing.queue_s)
        self.compute_input.add(input_s)
        self.compute_infer.add(timing.compute_s)
        self.compute_output.add(output_s)
        self.inference_count += sequences
        self.last_inference_ms = int(time.time() * 1e3)

    def record_run(self, sequences: int, compute_s: float) -> None:
        """One engine run (a batch of one or more requests)."""
        self.execution_count += 1
        self.compute_by_batch.setdefault(sequences, Duration()).add(compute_s)

    def record_failure(self, total_s: float) -> None:
        self.fail.add(total_s)
