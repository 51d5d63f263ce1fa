"""Whether onnxruntime's CUDA provider really works here, decided once, before any GPU test runs.

Without a GPU the GPU tests skip. `make gpu-check` sets ATTNSERVE_REQUIRE_GPU=1: there a CUDA provider that does
not initialise fails every GPU test instead, so a broken CUDA or cuDNN setup cannot pass as "all skipped".
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import onnxruntime as ort
import pytest

from model.fused_graphs import build_mha_graph
from model.weights import seeded_weights

CUDA_EP = "CUDAExecutionProvider"


def require_gpu() -> bool:
    """True where the GPU tests must run (make gpu-check), not skip."""
    return os.environ.get("ATTNSERVE_REQUIRE_GPU", "") == "1"


def open_cuda_session(model: Path | bytes) -> tuple[ort.InferenceSession | None, str]:
    """(a session on CUDA, "") or (None, why not)."""
    offered = ort.get_available_providers()
    if CUDA_EP not in offered:
        return None, f"onnxruntime {ort.__version__} offers no {CUDA_EP} (only {', '.join(offered)})"
    try:
        session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, providers=[CUDA_EP])
    except Exception as e:  # missing CUDA/cuDNN libraries or no device surface as assorted errors
        return None, f"a session on {CUDA_EP} failed: {e}"
    if session.get_providers()[0] != CUDA_EP:
        return None, f"a session on {CUDA_EP} fell back to {session.get_providers()[0]}"
    return session, ""


def cuda_session(model: Path | bytes) -> ort.InferenceSession | None:
    return open_cuda_session(model)[0]


@functools.cache
def cuda_problem() -> str:
    """Why CUDA is unusable here ("" when a small attention graph runs on it)."""
    return open_cuda_session(build_mha_graph(seeded_weights(8), 2, False, False).SerializeToString())[1]


def gpu_marks() -> list[pytest.MarkDecorator]:
    """A GPU test module's pytestmark: marker gpu; skipped without a usable CUDA provider unless it is required
    (then tests/gpu/conftest.py fails each test with the reason)."""
    problem = cuda_problem()
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(bool(problem) and not require_gpu(), reason=f"no usable CUDA execution provider: {problem}"),
    ]
