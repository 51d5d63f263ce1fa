"""Where the projection weights come from: a seed, a state dict file, or a BERT checkpoint.

Every source yields the same thing: ``dict[name, float32 ndarray]`` in PyTorch Linear
layout (``q_proj.weight`` is [d_model_out, d_model_in], y = x·Wᵀ + b), the names in
``PARAM_NAMES``. That dict is what `weights.npz` holds and what the numpy reference reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The weights layout and its check, the checkpoint reader and the file hash live in the client, whose explain reads
# BERT checkpoints too and may not import model/: one copy, re-exported here where export and tests find them.
from attnserve_client.explain.checkpoints import bert_attention_weights, bert_prefix, check_layer, read_bert_config
from attnserve_client.explain.checkpoints import file_sha256 as file_sha256
from attnserve_client.explain.reference import PARAM_NAMES, PROJECTIONS, Weights, WeightsError, validate


def seeded_weights(d_model: int, seed: int = 0) -> Weights:
    """nn.Linear's default init (U(±1/√d)), drawn from numpy so it is the same on every run and torch version."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(d_model)
    weights: Weights = {}
    for proj in PROJECTIONS:
        weights[f"{proj}.weight"] = rng.uniform(-bound, bound, (d_model, d_model)).astype(np.float32)
        weights[f"{proj}.bias"] = rng.uniform(-bound, bound, (d_model,)).astype(np.float32)
    return weights


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
