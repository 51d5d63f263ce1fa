"""The image's requirement files, derived from pyproject.toml (the one place the pins live).

Run by the Dockerfile's requirements stage: `python3 requirements.py PYPROJECT OUT_DIR`. A file rather than a RUN
heredoc, so that every builder (BuildKit, buildah) reads the Dockerfile alike. Standard library only.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Distributions of this repository, on no index: the export stage installs them from the build context.
LOCAL = ("attnserve-client",)


def name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower()


def write_requirements(pyproject: Path, out: Path) -> None:
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime, export = project["dependencies"], project["optional-dependencies"]["export"]
    if not any(r.startswith("onnxruntime-gpu==") for r in runtime):
        raise SystemExit("expected onnxruntime-gpu pinned in dependencies")
    if any(r.startswith("torch") for r in runtime):
        raise SystemExit("torch must stay out of the runtime dependencies")
    out.mkdir(parents=True, exist_ok=True)
    # cpu: plain onnxruntime of the same version. The -gpu wheel runs on CPU too, but its CUDA and TensorRT
    # providers (about 300 MB) are never loaded on a CPU host.
    cpu = [r.replace("onnxruntime-gpu==", "onnxruntime==") for r in runtime]
    (out / "cpu.txt").write_text("\n".join(cpu) + "\n")
    (out / "cuda.txt").write_text("\n".join(runtime) + "\n")
    (out / "torch.txt").write_text("\n".join(r for r in export if r.startswith("torch==")) + "\n")
    rest = [r for r in export if not r.startswith("torch==") and name(r) not in LOCAL]
    (out / "export.txt").write_text("\n".join(rest) + "\n")


if __name__ == "__main__":
    write_requirements(Path(sys.argv[1]), Path(sys.argv[2]))
