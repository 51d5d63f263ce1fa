"""The engine serves the graph bytes the model directory hashed, not whatever the files hold by the time it loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service.engine import INPUT, OUTPUT, Engine
from service.model_dir import load_model_directory


def _shifted(model: bytes) -> bytes:
    """The same graph, valid, computing something else: its output bias plus one."""
    graph = onnx.load_from_string(model)
    (bias,) = (t for t in graph.graph.initializer if t.name.endswith("out_proj.bias"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1), bias.name))
    return graph.SerializeToString()


def test_a_graph_swapped_after_the_check_is_not_served(served_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(served_model, copy)
    config, weights = read_model_dir(copy)
    model = load_model_directory(copy)  # checked against config.json's sha256 here
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, config["d_model"]), dtype=np.float32)
    mask = np.ones((2, 9), dtype=np.int32)
    mask[1, 6:] = 0
    for graph in model.graphs_for("cpu"):  # every graph the engine loads, swapped on disk after the check
        graph.path.write_bytes(_shifted(graph.model))
    # What the swapped file computes: a session loaded from the path (the old way) is off by the shifted bias.
    swapped = ort.InferenceSession(str(model.route("cpu", False, 9).path), providers=["CPUExecutionProvider"])
    expected, _ = reference_attention(weights, config["num_heads"], x, None, config["causal"])
    assert relative_l2(swapped.run([OUTPUT], {INPUT: x})[0], expected) > 0.1

    engine = Engine(model, "cpu")
    for m in (None, mask):
        expected, probs = reference_attention(weights, config["num_heads"], x, m, config["causal"])
        assert relative_l2(engine.run(x, m, want_probs=False).output, expected) <= 1e-5
        both = engine.run(x, m, want_probs=True)
        assert relative_l2(both.output, expected) <= 1e-5 and relative_l2(both.probs, probs) <= 1e-5
