"""The torch module, both its paths, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.attention import AttentionConfig
from model.reference import reference_attention, relative_l2
from model.torch_export import build_module
from model.weights import seeded_weights


def _ragged_mask(B: int, L: int) -> np.ndarray:
    mask = np.ones((B, L), np.int32)
    for b in range(1, B):
        mask[b, L - b * L // (B + 1) :] = 0  # each row its own length
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("L", [1, 7, 64])
def test_module_matches_reference(causal: bool, fast: bool, L: int) -> None:
    weights = seeded_weights(64, seed=2)
    module = build_module(weights, AttentionConfig(64, 4, causal))
    module.use_fast_path = fast
    x = np.random.default_rng(L).standard_normal((3, L, 64), dtype=np.float32)
    for mask in (None, _ragged_mask(3, L)):
        with torch.no_grad():
            out, w = module(torch.from_numpy(x), None if mask is None else torch.from_numpy(mask))
        expected, _ = reference_attention(weights, 4, x, mask, causal)
        assert w is None
        assert relative_l2(out.numpy(), expected) <= 1e-5
        assert np.abs(out.numpy() - expected).max() <= 1e-4


def test_need_weights_returns_probabilities() -> None:
    weights = seeded_weights(32)
    module = build_module(weights, AttentionConfig(32, 4, causal=True))
    x = np.random.default_rng(0).standard_normal((2, 9, 32), dtype=np.float32)
    mask = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)
    with torch.no_grad():
        out, probs = module(torch.from_numpy(x), torch.from_numpy(mask), need_weights=True)
    expected_out, expected_probs = reference_attention(weights, 4, x, mask, causal=True)
    assert probs.shape == (2, 4, 9, 9)
    assert relative_l2(probs.numpy(), expected_probs) <= 1e-5
    assert relative_l2(out.numpy(), expected_out) <= 1e-5
    assert torch.all(probs[1, :, :, 5:] == 0)  # padded keys: exactly zero
    assert torch.all(probs[1, :, 5:, :] == 0) and torch.all(out[1, 5:] == 0)  # padded queries: zero
    assert torch.all(torch.triu(probs[0], diagonal=1) == 0)  # causal: no future keys


@pytest.mark.parametrize("fast", [True, False])
def test_fully_padded_sequence_is_zero_not_nan(fast: bool) -> None:
    module = build_module(seeded_weights(16), AttentionConfig(16, 2))
    module.use_fast_path = fast
    with torch.no_grad():
        out, _ = module(torch.randn(1, 4, 16), torch.zeros(1, 4, dtype=torch.int32))
    assert torch.all(out == 0)


@pytest.mark.parametrize(
    ("d_model", "heads", "message"),
    [
        (10, 3, "divisible"),
        (8, 0, "positive"),
        (8, -2, "positive"),
        (0, 1, "positive"),
    ],
)
def test_config_rejects_bad_shapes(d_model: int, heads: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionConfig(d_model, heads)
