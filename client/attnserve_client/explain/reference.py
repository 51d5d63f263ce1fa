"""The attention weights of one layer (PARAM_NAMES in PyTorch Linear layout) and the float64 numpy reference of the
maths the service serves over them.

Independent of torch and of every ONNX graph, so it can judge them all (see model/attention.py for the definition
of masks and padded query rows). It lives in the client because explain's BERT encoder (bert.py) runs it, and the
client imports nothing of model/; model/ imports it from here (model/reference.py, model/weights.py): one copy.
"""

from __future__ import annotations

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
PARAM_NAMES = tuple(f"{p}.{kind}" for p in PROJECTIONS for kind in ("weight", "bias"))

# ``q_proj.weight`` is [d_model_out, d_model_in], y = x·Wᵀ + b.
Weights = dict[str, np.ndarray]


class WeightsError(ValueError):
    """A weights source that does not exist or does not fit; the message says which and why."""


def validate(weights: Weights, source: str) -> int:
    """Check names and shapes; return d_model."""
    missing = [n for n in PARAM_NAMES if n not in weights]
    if missing:
        found = ", ".join(sorted(weights)[:8]) or "nothing"
        raise WeightsError(f"{source}: missing {', '.join(missing)}; expected {', '.join(PARAM_NAMES)} (found {found})")
    d_model = weights["q_proj.weight"].shape[0]
    for name in PARAM_NAMES:
        want = (d_model, d_model) if name.endswith("weight") else (d_model,)
        got = tuple(weights[name].shape)
        if got != want:
            raise WeightsError(f"{source}: {name} has shape {list(got)}, expected {list(want)} for d_model {d_model}")
    return d_model


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
