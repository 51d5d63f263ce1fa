"""On a CUDA machine: the graphs the CUDA routing names run on the CUDA EP and match the reference.

CI has no GPU: these skip unless onnxruntime's CUDA provider actually initialises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model.export import read_model_dir
from model.fused_graphs import build_mha_graph
from model.reference import reference_attention, relative_l2
from model.weights import seeded_weights


def _cuda_session(model: Path | bytes) -> ort.InferenceSession | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    try:
        session = ort.InferenceSession(
            str(model) if isinstance(model, Path) else model, providers=["CUDAExecutionProvider"]
        )
    except Exception:  # missing CUDA/cuDNN libraries surface as assorted errors
        return None
    return session if session.get_providers()[0] == "CUDAExecutionProvider" else None


# Decided before any fixture runs, so a machine without a GPU pays nothing for these tests.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        _cuda_session(build_mha_graph(seeded_weights(8), 2, False, False).SerializeToString()) is None,
        reason="no usable CUDA execution provider here",
    ),
]


def test_cuda_routed_graphs_match_reference(exported_model: Path) -> None:
    config, weights = read_model_dir(exported_model)
    rng = np.random.default_rng(0)
    for variant, tables in config["routing"]["cuda"].items():
        for entry in tables:
            session = _cuda_session(exported_model / config["graphs"][entry["graph"]]["file"])
            assert session is not None, f"{entry['graph']} did not initialise on CUDA"
            x = rng.standard_normal((3, 300, config["d_model"]), dtype=np.float32)
            mask = np.ones((3, 300), np.int32)
            mask[1, 200:] = 0
            masked = variant == "masked"
            feed = {"hidden_states": x, "attention_mask": mask} if masked else {"hidden_states": x}
            expected, _ = reference_attention(
                weights, config["num_heads"], x, mask if masked else None, config["causal"]
            )
            # TF32 / fused kernels on GPU: a looser bound than the CPU's 1e-5.
            assert relative_l2(session.run(None, feed)[0], expected) <= 1e-3
