"""A float64 numpy reference of the served maths, computed only from the weights dict.

Independent of torch and of every ONNX graph, so it can judge them all (see model/attention.py
for the definition of masks and padded query rows).
"""

from __future__ import annotations

import numpy as np

from model.weights import Weights


class ParityError(Exception):
    """A graph disagrees with this reference beyond tolerance."""


def reference_attention(
    weights: Weights,
    num_heads: int,
    x: np.ndarray,
    mask: np.ndarray | None = None,
    causal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (output [B, L, d], probabilities [B, h, L, L]) in float64."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x = np.asarray(x, dtype=np.float64)
    B, L, d = x.shape
    dk = d // num_heads

    def project(name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]  # (B, L, d)

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(B, L, num_heads, dk).transpose(0, 2, 1, 3)  # (B, h, L, dk)

    q, k, v = heads(project("q_proj")), heads(project("k_proj")), heads(project("v_proj"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dk)  # (B, h, L, L)
    real = np.ones((B, L), dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    allowed = np.broadcast_to(real[:, None, None, :], scores.shape)
    if causal:
        allowed = allowed & np.tril(np.ones((L, L), dtype=bool))
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    probs = np.where(allowed, np.exp(scores - row_max), 0.0)
    denom = probs.sum(axis=-1, keepdims=True)
    probs = probs / np.where(denom > 0, denom, 1.0)
    probs = probs * real[:, None, :, None]  # padded query rows: all zero
    z = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, d)  # heads concatenated
    out = z @ w["out_proj.weight"].T + w["out_proj.bias"]
    out = out * real[:, :, None]  # padded query rows: zero vector
    return out, probs


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖a − e‖₂ / ‖e‖₂ (or ‖a‖₂ when e is all zero)."""
    diff = np.linalg.norm(np.asarray(actual, np.float64) - expected)
    scale = np.linalg.norm(expected)
    return float(diff / scale) if scale > 0 else float(diff)
