"""On a CUDA machine: the service picks CUDA by itself, serves through IO binding, and matches the reference.

CI has no GPU: these skip unless onnxruntime's CUDA provider actually initialises (fail instead under
ATTNSERVE_REQUIRE_GPU=1, as make gpu-check sets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnserve_client import AttentionClient, WeightsQuery
from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from tests.gpu.cuda import gpu_marks
from tests.server_process import start_server

pytestmark = gpu_marks()


@pytest.mark.parametrize("provider", ["auto", "cuda"])
def test_service_on_cuda_matches_the_reference(served_model: Path, provider: str) -> None:
    config, weights = read_model_dir(served_model)
    process = start_server(served_model, "--provider", provider)
    try:
        assert "provider cuda: a session on CUDAExecutionProvider initialised" in process.log()
        x = np.random.default_rng(0).standard_normal((2, 300, config["d_model"]), dtype=np.float32)
        with AttentionClient(process.address, timeout_s=60) as client:
            assert client.info().provider == "cuda"
            full = client.attend(x)
            padded = client.attend(x, lengths=[300, 120], weights=WeightsQuery(positions=(5,)))
        expected, _ = reference_attention(weights, config["num_heads"], x, None, config["causal"])
        assert relative_l2(full.output, expected) <= 1e-4  # TF32/fused kernels on the GPU: a looser bound
        mask = np.ones((2, 300), np.int32)
        mask[1, 120:] = 0
        expected_masked, probs = reference_attention(weights, config["num_heads"], x, mask, config["causal"])
        assert relative_l2(padded.output, expected_masked) <= 1e-4
        assert relative_l2(padded.weights, probs[:, :, [5], :]) <= 1e-4
    finally:
        assert process.stop() == 0
