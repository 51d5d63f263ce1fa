"""The numpy reference judges every graph, so it is itself checked against the formula, head by head."""

from __future__ import annotations

import numpy as np
import pytest

from model.reference import reference_attention, relative_l2
from model.weights import seeded_weights


def _softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def _by_the_formula(weights, heads, x, mask, causal):
    """One query at a time, one head at a time: Z = concat_h(softmax(q·Kᵀ/√d_k)·V)·W_Oᵀ + b_O."""
    B, L, d = x.shape
    dk = d // heads
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    out = np.zeros((B, L, d))
    for b in range(B):
        Q = x[b] @ W["q_proj.weight"].T + W["q_proj.bias"]
        K = x[b] @ W["k_proj.weight"].T + W["k_proj.bias"]
        V = x[b] @ W["v_proj.weight"].T + W["v_proj.bias"]
        for i in range(L):
            if not mask[b, i]:
                continue  # padded query row: zero by definition
            keys = [j for j in range(L) if mask[b, j] and (not causal or j <= i)]
            z = []
            for h in range(heads):
                s = slice(h * dk, (h + 1) * dk)
                scores = np.array([Q[i, s] @ K[j, s] / np.sqrt(dk) for j in keys])
                z.append(_softmax(scores) @ V[keys, s])
            out[b, i] = np.concatenate(z) @ W["out_proj.weight"].T + W["out_proj.bias"]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_the_formula_query_by_query(causal: bool) -> None:
    rng = np.random.default_rng(3)
    weights = seeded_weights(12, seed=5)
    x = rng.standard_normal((2, 6, 12))
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    out, probs = reference_attention(weights, 3, x, mask, causal)
    assert relative_l2(out, _by_the_formula(weights, 3, x, mask, causal)) < 1e-12
    real = mask.astype(bool)
    np.testing.assert_allclose(probs.sum(-1)[real[:, None, :].repeat(3, 1)], 1.0, atol=1e-12)
    assert np.all(probs[1, :, :, [0, 4, 5]] == 0)  # padded keys
    assert np.all(out[1, [0, 4, 5]] == 0) and np.all(probs[1, :, [0, 4, 5], :] == 0)  # padded queries


def test_fully_padded_sequence_is_zero_not_nan() -> None:
    weights = seeded_weights(8)
    out, probs = reference_attention(weights, 2, np.ones((1, 3, 8)), np.zeros((1, 3), np.int32))
    assert np.all(out == 0) and np.all(probs == 0)
