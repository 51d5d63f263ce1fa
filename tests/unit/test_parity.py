"""Every exported graph against the float64 reference computed from weights.npz alone."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from model.export import read_config, read_model_dir
from model.reference import reference_attention, relative_l2
from model.timing import cpu_session
from model.weights import file_sha256

SEQS = (1, 2, 7, 64, 511, 2048)
BATCHES = (1, 3)


@cache
def _inputs(batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Random states and a ragged mask: every row its own length, one row left-padded."""
    rng = np.random.default_rng(batch * 10_000 + seq)
    x = rng.standard_normal((batch, seq, 512), dtype=np.float32)
    mask = np.ones((batch, seq), np.int32)
    if batch > 1:
        mask[1, max(1, seq - seq // 3) :] = 0
        mask[2, : seq // 4] = 0
    return x, mask


def test_directory_is_complete_and_hashed(exported_model: Path) -> None:
    config = read_config(exported_model)
    on_disk = {p.name for p in exported_model.iterdir()} - {"config.json"}
    assert set(config["files"]) == on_disk
    assert all(file_sha256(exported_model / name) == digest for name, digest in config["files"].items())
    assert {"weights.npz", "weights.onnx", "plain.onnx", "plain_masked.onnx", "mha.onnx"} <= on_disk
    for provider in ("cpu", "cuda"):
        for variant, tables in config["routing"][provider].items():
            for entry in tables:
                assert entry["graph"] in config["graphs"]
                assert config["graphs"][entry["graph"]]["masked"] == (variant == "masked")
    assert config["causal"] == exported_model.name.startswith("causal")


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("batch", BATCHES)
def test_every_graph_matches_reference(exported_model: Path, batch: int, seq: int) -> None:
    config, weights = read_model_dir(exported_model)
    x, mask = _inputs(batch, seq)
    expected = {
        False: reference_attention(weights, 8, x, None, config["causal"]),
        True: reference_attention(weights, 8, x, mask, config["causal"]),
    }
    for name, graph in config["graphs"].items():
        session = cpu_session(exported_model / graph["file"], threads=2)
        feed = {"hidden_states": x, "attention_mask": mask} if graph["masked"] else {"hidden_states": x}
        outputs = session.run(None, feed)
        out, probs = expected[graph["masked"]]
        where = f"{name} B={batch} L={seq}"
        assert relative_l2(outputs[0], out) <= 1e-5, where
        assert np.abs(outputs[0] - out).max() <= 1e-4, where
        if graph["masked"]:
            assert np.all(outputs[0][~mask.astype(bool)] == 0), f"{where}: padded query rows must be 0"
        if "attention_weights" in graph["outputs"]:
            weights_out = outputs[1]
            assert weights_out.shape == (batch, 8, seq, seq)
            assert relative_l2(weights_out, probs) <= 1e-5, where
            real = mask.astype(bool)
            row_sums = weights_out.sum(-1, dtype=np.float64)[real[:, None, :].repeat(8, axis=1)]
            assert np.abs(row_sums - 1).max() <= 1e-6, where
            padded_keys = np.broadcast_to(~real[:, None, None, :], weights_out.shape)
            assert np.all(weights_out[padded_keys] == 0), f"{where}: padded keys must get exactly 0"
            if config["causal"]:
                assert np.all(np.triu(weights_out, k=1) == 0), f"{where}: causal graph attends to the future"


def test_a_wrong_mask_would_be_caught(exported_model: Path) -> None:
    """The checks above can fail: ignoring the mask gives a different answer for padded rows' neighbours."""
    config, weights = read_model_dir(exported_model)
    x, mask = _inputs(3, 64)
    session = cpu_session(exported_model / config["graphs"]["mha_masked"]["file"], threads=2)
    served = session.run(None, {"hidden_states": x, "attention_mask": mask})[0]
    unmasked, _ = reference_attention(weights, 8, x, None, config["causal"])
    assert relative_l2(served, unmasked) > 1e-2


def test_padded_keys_stay_out_at_large_scores(exported_model: Path) -> None:
    """Inputs of scale 300 make scores far beyond 1e4: padded keys must still get no weight in every masked graph."""
    config, weights = read_model_dir(exported_model)
    x, mask = _inputs(3, 64)
    x = x * np.float32(300)
    expected, _ = reference_attention(weights, 8, x, mask, config["causal"])
    for name, graph in config["graphs"].items():
        if graph["masked"]:
            session = cpu_session(exported_model / graph["file"], threads=2)
            served = session.run(None, {"hidden_states": x, "attention_mask": mask})[0]
            assert relative_l2(served, expected) <= 1e-5, name
