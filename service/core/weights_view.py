"""Cut the rows a client asked for out of the full attention probabilities."""

from __future__ import annotations

import numpy as np

from service.core.types import WeightsResult, WeightsSpec


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
    keys = top_keys(rows, k)
    values = np.take_along_axis(rows, keys, axis=-1)
    return WeightsResult(positions, spec.average_heads, values.astype(np.float32), keys.astype(np.int32))


def top_keys(rows: np.ndarray, k: int) -> np.ndarray:
    """The key positions of each row's k highest weights, highest first, ties broken by the lower position: what a
    stable descending sort gives, without sorting whole rows (a weights request of batch 8 x 1024 with top-k had
    its engine thread sorting for seconds). The k-th highest value splits each row: every key above it, then the
    lowest positions among those equal to it; only those k are sorted."""
    seq = rows.shape[-1]
    kth = np.partition(rows, seq - k, axis=-1)[..., seq - k : seq - k + 1]
    chosen = rows >= kth
    crowded = chosen.sum(axis=-1, dtype=np.int32) > k  # rows where the k-th value is tied past the k-th place
    if crowded.any():
        row, tied = rows[crowded], rows[crowded] == kth[crowded]
        room = k - (row > kth[crowded]).sum(axis=-1, keepdims=True, dtype=np.int32)
        chosen[crowded] = (row > kth[crowded]) | (tied & (np.cumsum(tied, axis=-1, dtype=np.int32) <= room))
    keys = np.nonzero(chosen)[-1].reshape(*rows.shape[:-1], k)  # exactly k per row, in ascending position
    order = np.argsort(-np.take_along_axis(rows, keys, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(keys, order, axis=-1)
