"""On a CUDA machine: the graphs the CUDA routing names run on the CUDA EP and match the reference.

CI has no GPU: these skip unless onnxruntime's CUDA provider actually initialises (fail instead under
ATTNSERVE_REQUIRE_GPU=1, as make gpu-check sets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from tests.gpu.cuda import cuda_session, gpu_marks

# Decided before any fixture runs, so a machine without a GPU pays nothing for these tests.
pytestmark = gpu_marks()


def test_cuda_routed_graphs_match_reference(exported_model: Path) -> None:
    config, weights = read_model_dir(exported_model)
    rng = np.random.default_rng(0)
    for variant, tables in config["routing"]["cuda"].items():
        for entry in tables:
            session = cuda_session(exported_model / config["graphs"][entry["graph"]]["file"])
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
