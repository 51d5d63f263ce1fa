"""Where the projection weights come from: a seed, a state dict file, or a BERT checkpoint.

Every source yields the same thing: ``dict[name, float32 ndarray]`` in PyTorch Linear
layout (``q_proj.weight`` is [d_model_out, d_model_in], y = x·Wᵀ + b), the names in
``PARAM_NAMES``. That dict is what `weights.npz` holds and what the numpy reference reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from model.checkpoints import CheckpointError, verified_sha256
from model.checkpoints import file_sha256 as file_sha256  # where export and tests have always found it

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
PARAM_NAMES = tuple(f"{p}.{kind}" for p in PROJECTIONS for kind in ("weight", "bias"))

Weights = dict[str, np.ndarray]

# BERT names of one layer's self-attention, relative to "encoder.layer.N.attention.".
_BERT_NAMES = {
    "q_proj": "self.query",
    "k_proj": "self.key",
    "v_proj": "self.value",
    "out_proj": "output.dense",
}


class WeightsError(ValueError):
    """A weights source that does not exist or does not fit; the message says which and why."""


def seeded_weights(d_model: int, seed: int = 0) -> Weights:
    """nn.Linear's default init (U(±1/√d)), drawn from numpy so it is the same on every run and torch version."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(d_model)
    weights: Weights = {}
    for proj in PROJECTIONS:
        weights[f"{proj}.weight"] = rng.uniform(-bound, bound, (d_model, d_model)).astype(np.float32)
        weights[f"{proj}.bias"] = rng.uniform(-bound, bound, (d_model,)).astype(np.float32)
    return weights


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


def load_state_dict(path: Path) -> Weights:
    """A `.pt`, `.safetensors` or `.npz` file holding PARAM_NAMES in Linear layout."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"checkpoint {path} does not exist (expected a .pt, .safetensors or .npz file or a BERT directory)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as data:
            raw = {k: data[k] for k in data.files}
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        raw = load_file(str(path))
    elif suffix in (".pt", ".pth", ".bin"):
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True)
        raw = {k: v.detach().float().numpy() for k, v in loaded.items()}
    else:
        raise WeightsError(f"checkpoint {path}: unknown format {suffix!r}; use .pt, .safetensors or .npz")
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    validate(weights, str(path))
    return {name: weights[name] for name in PARAM_NAMES}


def read_bert_config(checkpoint_dir: Path) -> tuple[dict, str]:
    """config.json of a BERT-family checkpoint directory (integer layers and heads checked) and the sha256 of the
    model.safetensors beside it, which for a known checkpoint (model/checkpoints.py) must be the recorded one."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path, tensors_path = checkpoint_dir / "config.json", checkpoint_dir / "model.safetensors"
    for needed in (config_path, tensors_path):
        if not needed.is_file():
            raise WeightsError(
                f"checkpoint {checkpoint_dir}: {needed.name} not found "
                "(a BERT directory needs config.json and model.safetensors)"
            )
    config = json.loads(config_path.read_text())
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise WeightsError(f"{config_path}: needs integer num_hidden_layers and num_attention_heads")
    try:
        return config, verified_sha256(checkpoint_dir)
    except CheckpointError as e:
        raise WeightsError(str(e)) from None


def check_layer(checkpoint_dir: Path, config: dict, layer: int) -> None:
    layers = config["num_hidden_layers"]
    if not 0 <= layer < layers:
        raise WeightsError(f"--layer {layer} is out of range: {checkpoint_dir} has layers 0..{layers - 1}")


def bert_prefix(keys: Collection[str]) -> str:
    """The key prefix: "bert." in checkpoints saved from a task model (BertForX), none in a bare BertModel's."""
    return "bert." if any(k.startswith("bert.encoder.") for k in keys) else ""


def bert_attention_weights(
    keys: Collection[str], get: Callable[[str], np.ndarray], layer: int, source: str, prefix: str
) -> Weights:
    """Layer `layer`'s self-attention in PARAM_NAMES (BERT's Linear layers already use our layout)."""
    weights: Weights = {}
    for proj, bert_name in _BERT_NAMES.items():
        for kind in ("weight", "bias"):
            key = f"{prefix}encoder.layer.{layer}.attention.{bert_name}.{kind}"
            if key not in keys:
                raise WeightsError(f"{source}: tensor {key} not found; is this a BERT-family checkpoint?")
            weights[f"{proj}.{kind}"] = np.asarray(get(key), dtype=np.float32)
    validate(weights, f"{source} layer {layer}")
    return weights


def load_bert_layer(checkpoint_dir: Path, layer: int) -> tuple[Weights, int]:
    """Self-attention of encoder layer ``layer`` of a BERT-family checkpoint; returns (weights, num_heads)."""
    checkpoint_dir = Path(checkpoint_dir)
    config, _ = read_bert_config(checkpoint_dir)
    check_layer(checkpoint_dir, config, layer)
    heads = config["num_attention_heads"]
    tensors_path = checkpoint_dir / "model.safetensors"

    from safetensors import safe_open

    with safe_open(str(tensors_path), framework="numpy") as f:
        keys = set(f.keys())
        weights = bert_attention_weights(keys, f.get_tensor, layer, str(tensors_path), bert_prefix(keys))
    d_model = weights["q_proj.weight"].shape[0]
    if d_model % heads:
        raise WeightsError(
            f"{checkpoint_dir / 'config.json'}: hidden size {d_model} is not divisible by num_attention_heads {heads}"
        )
    return weights, heads


def save_npz(weights: Weights, path: Path) -> None:
    np.savez(path, **{name: weights[name] for name in PARAM_NAMES})  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
