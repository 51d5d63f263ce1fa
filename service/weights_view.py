"""Cut the rows a client asked for out of the full attention probabilities."""

from __future__ import annotations

import numpy as np

from service.types import WeightsResult, WeightsSpec


def select_weights(probs: np.ndarray, spec: WeightsSpec) -> WeightsResult:
    """probs (B, H, S, S) -> the spec's query rows, per head or averaged, all keys or the top k (highest first)."""
    seq = probs.shape[-1]
    positions = tuple(range(seq)) if spec.positions is None else spec.positions
    rows = probs if spec.positions is None else probs[:, :, list(positions), :]  # (B, H, P, S)
    if spec.average_heads:
        rows = rows.mean(axis=1, keepdims=True, dtype=np.float32)  # (B, 1, P, S)
    if not spec.top_k:
        return WeightsResult(positions, spec.average_heads, np.ascontiguousarray(rows, dtype=np.float32))
    k = min(spec.top_k, seq)
    # Stable sort of the negated weights: ties keep the lower key position first.
    order = np.argsort(-rows, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(rows, order, axis=-1)
    return WeightsResult(positions, spec.average_heads, values.astype(np.float32), order.astype(np.int32))
