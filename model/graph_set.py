"""Every graph a model directory may hold: written from one set of weights, checked as a set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model.attention import AttentionConfig
from model.fused_graphs import INPUT, MASK, build_attention23_graph, build_mha_graph
from model.reference import ParityError, reference_attention, relative_l2
from model.timing import cpu_session
from model.torch_export import build_module, export_plain
from model.weights import Weights

_FUSED_BUILDERS = {"mha": build_mha_graph, "attention23": build_attention23_graph}


def write_graphs(weights: Weights, config: AttentionConfig, directory: Path, opset: int) -> dict[str, dict[str, Any]]:
    """Write plain (torch export), mha and attention23, each unmasked and masked, and the weights graph.

    Returns {graph name: {"file", "form", "masked", "outputs"}} as recorded in config.json.
    """
    graphs: dict[str, dict[str, object]] = {}

    def record(name: str, form: str, masked: bool, outputs: list[str]) -> Path:
        graphs[name] = {"file": f"{name}.onnx", "form": form, "masked": masked, "outputs": outputs}
        return directory / f"{name}.onnx"

    module = build_module(weights, config)
    export_plain(module, record("plain", "plain", False, ["output"]), masked=False, opset=opset)
    export_plain(module, record("plain_masked", "plain", True, ["output"]), masked=True, opset=opset)
    for form, build in _FUSED_BUILDERS.items():
        for masked in (False, True):
            name = f"{form}_masked" if masked else form
            onnx.save(build(weights, config.num_heads, config.causal, masked), record(name, form, masked, ["output"]))
    export_plain(
        module,
        record("weights", "plain", True, ["output", "attention_weights"]),
        masked=True,
        with_weights=True,
        opset=opset,
    )
    return graphs


def parity_inputs(d_model: int, max_seq_len: int, seed: int = 1234) -> list[tuple[np.ndarray, np.ndarray]]:
    """Small shapes that still catch a wrong formula or mask: odd lengths, ragged right and left padding."""
    rng = np.random.default_rng(seed)
    cases = []
    for seq in sorted({min(s, max_seq_len) for s in (1, 7, 64, 257)}):
        x = rng.standard_normal((3, seq, d_model), dtype=np.float32)
        mask = np.ones((3, seq), np.int32)
        mask[1, max(1, seq // 2) :] = 0  # right padding
        mask[2, : seq // 3] = 0  # left padding
        cases.append((x, mask))
    return cases


def check_parity(
    weights: Weights,
    config: AttentionConfig,
    graph_paths: dict[str, Path],
    *,
    max_seq_len: int,
    rel_l2: float,
    max_abs: float,
) -> dict[str, float]:
    """Run every graph against the reference; raise ParityError naming the first that fails."""
    worst = {"max_rel_l2": 0.0, "max_abs": 0.0, "max_prob_row_sum_error": 0.0}
    sessions = {name: cpu_session(path, threads=1) for name, path in graph_paths.items()}
    for x, mask in parity_inputs(config.d_model, max_seq_len):
        references = {
            masked: reference_attention(weights, config.num_heads, x, mask if masked else None, config.causal)
            for masked in (False, True)
        }
        for name, session in sessions.items():
            masked = any(i.name == MASK for i in session.get_inputs())
            feed = {INPUT: x, MASK: mask} if masked else {INPUT: x}
            outputs = session.run(None, feed)
            expected, probs = references[masked]
            err, abs_err = relative_l2(outputs[0], expected), float(np.abs(outputs[0] - expected).max())
            where = f"graph {name}, input {list(x.shape)}"
            if not (err <= rel_l2 and abs_err <= max_abs):
                raise ParityError(
                    f"{where}: rel L2 {err:.2e} (limit {rel_l2:.0e}), max abs {abs_err:.2e} (limit {max_abs:.0e})"
                )
            worst["max_rel_l2"] = max(worst["max_rel_l2"], err)
            worst["max_abs"] = max(worst["max_abs"], abs_err)
            if len(outputs) > 1:
                _check_probabilities(outputs[1], probs, mask, where)
                real_rows = outputs[1].sum(-1)[mask.astype(bool)[:, None, :].repeat(config.num_heads, 1)]
                worst["max_prob_row_sum_error"] = max(
                    worst["max_prob_row_sum_error"], float(np.abs(real_rows - 1).max())
                )
    return worst


def _check_probabilities(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray, where: str) -> None:
    if relative_l2(actual, expected) > 1e-5:
        raise ParityError(f"{where}: attention weights rel L2 {relative_l2(actual, expected):.2e} (limit 1e-05)")
    padded_keys = ~mask.astype(bool)[:, None, None, :]
    if np.any(np.where(padded_keys, actual, 0.0) != 0.0):
        raise ParityError(f"{where}: a padded key got non-zero weight")
