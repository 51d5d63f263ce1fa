"""The core's request and result: plain dataclasses and numpy arrays, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The model's tensors, as every graph of the model directory and both APIs name them.
INPUT = "hidden_states"
MASK = "attention_mask"
OUTPUT = "output"
WEIGHTS_OUTPUT = "attention_weights"
# The dtypes hidden states may come in (the graphs compute in FP32; an answer goes back in its request's dtype).
HIDDEN_DTYPES: tuple[np.dtype, ...] = (np.dtype("<f4"), np.dtype("<f2"))


@dataclass(frozen=True)
class WeightsSpec:
    """Which attention weights to return: rows of chosen query positions, per head or averaged, optionally top-k."""

    positions: tuple[int, ...] | None = None  # None: every query position
    average_heads: bool = False
    top_k: int = 0  # 0: full rows over every key


@dataclass
class AttentionRequest:
    hidden_states: np.ndarray  # (B, S, D) float32, C-contiguous
    mask: np.ndarray | None = None  # (B, S) 0/1 (int32 once checked), 1 = real token; None: no padding
    weights: WeightsSpec | None = None  # None: output only
    output_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() by which the answer is due
    wire_bytes: int = 0  # size of the request message it came in (its tensors are views of it), for the budget
    trace: object = None  # its observation's trace span when traced (service/observe/tracing.py); opaque here

    @property
    def batch_size(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.hidden_states.shape[1])


@dataclass
class WeightsResult:
    positions: tuple[int, ...]
    averaged: bool
    values: np.ndarray  # (B, H or 1, P, S) float32, or (B, H or 1, P, k) with top-k
    indices: np.ndarray | None = None  # (B, H or 1, P, k) int32 key positions, top-k only


@dataclass
class Timing:
    queue_s: float = 0.0
    compute_s: float = 0.0
    total_s: float = 0.0


@dataclass
class AttentionResult:
    output: np.ndarray  # (B, S, D) in the request's output dtype
    weights: WeightsResult | None
    graph: str
    timing: Timing
