"""Fused ONNX graphs built directly from the weights: the forms torch's exporter does not emit.

- ``mha``: onnxruntime's contrib op ``com.microsoft.MultiHeadAttention`` (on CPU it runs a
  flash-style kernel when there is no mask; on CUDA, flash / memory-efficient attention).
- ``attention23``: the standard ONNX opset-23 ``Attention`` op.

Both share the graph interface of the torch-exported graphs (model/torch_export.py):
``hidden_states`` FP32 [batch, seq, d_model], in masked variants ``attention_mask`` INT32
[batch, seq] (1 = real token), output ``output`` [batch, seq, d_model], padded query rows 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model.weights import Weights

INPUT, MASK, OUTPUT = "hidden_states", "attention_mask", "output"
ORT_IR_VERSION = 10  # onnxruntime 1.31 reads IR ≤ 13; 10 is what torch's exporter writes
ATTENTION23_IR_VERSION = 11  # opset 23 needs IR 11


FP32, FP16 = np.dtype(np.float32), np.dtype(np.float16)
_ONNX_TYPES = {FP32: TensorProto.FLOAT, FP16: TensorProto.FLOAT16}


def _packed_qkv(weights: Weights, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """W_Q, W_K, W_V side by side in x·W layout [d, 3d] and their biases [3d]: one GEMM for all three."""
    w = np.concatenate([weights[f"{p}.weight"].T for p in ("q_proj", "k_proj", "v_proj")], axis=1)
    b = np.concatenate([weights[f"{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")])
    return np.ascontiguousarray(w, dtype=dtype), b.astype(dtype)


class _GraphBuilder:
    """Collects nodes and initializers; keeps each builder below readable."""

    def __init__(self, dtype: np.dtype = FP32) -> None:
        self.dtype = np.dtype(dtype)  # of the hidden states, weights and output
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(self.dtype)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], domain=domain, **attrs))
        return output

    def model(self, name: str, d_model: int, masked: bool, opsets: dict[str, int], ir_version: int) -> onnx.ModelProto:
        elem = _ONNX_TYPES[self.dtype]
        inputs = [helper.make_tensor_value_info(INPUT, elem, ["batch", "seq", d_model])]
        if masked:
            inputs.append(helper.make_tensor_value_info(MASK, TensorProto.INT32, ["batch", "seq"]))
        outputs = [helper.make_tensor_value_info(OUTPUT, elem, ["batch", "seq", d_model])]
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets.items()],
            ir_version=ir_version,
            producer_name="attnserve.model.export",
        )
        onnx.checker.check_model(model)
        return model

    def project_out(self, z: str, weights: Weights, masked: bool) -> None:
        """Z·W_Oᵀ + b_O, then zero the padded query rows (masked variants)."""
        wo = self.const("out_proj.weight_t", np.ascontiguousarray(weights["out_proj.weight"].T))
        bo = self.const("out_proj.bias", weights["out_proj.bias"])
        projected = self.node("MatMul", [z, wo], "out_matmul")
        if not masked:
            self.node("Add", [projected, bo], OUTPUT)
            return
        biased = self.node("Add", [projected, bo], "out_biased")
        real = self.node("Cast", [MASK], "mask_bool", to=TensorProto.BOOL)
        real_rows = self.node("Unsqueeze", [real, self.const("axis_last", np.array([-1], np.int64))], "real_rows")
        self.node("Where", [real_rows, biased, self.const("zero", np.array(0.0, np.float32))], OUTPUT)


def build_mha_graph(
    weights: Weights, num_heads: int, causal: bool, masked: bool, dtype: np.dtype = FP32
) -> onnx.ModelProto:
    """X·[W_Q W_K W_V] in one GEMM, then com.microsoft.MultiHeadAttention (bias added inside), then W_O.

    ``dtype`` float16 gives the CUDA graph (hidden states, weights and output in FP16).
    """
    d_model = weights["q_proj.weight"].shape[0]
    g = _GraphBuilder(dtype)
    w_qkv, b_qkv = _packed_qkv(weights, g.dtype)
    qkv = g.node("MatMul", [INPUT, g.const("qkv_weight", w_qkv)], "qkv")
    split = g.const("qkv_split", np.array([d_model] * 3, np.int64))
    g.nodes.append(helper.make_node("Split", [qkv, split], ["q", "k", "v"], axis=2))
    mha_inputs = ["q", "k", "v", g.const("qkv_bias", b_qkv)] + ([MASK] if masked else [])
    # Masked keys get the dtype's lowest score, not the op's default of -10000: scores beyond 1e4 (inputs of scale
    # ~300) would otherwise let padded keys through, and a request padded in a batch would differ from it alone.
    lowest = float(np.finfo(g.dtype).min)
    z = g.node(
        "MultiHeadAttention", mha_inputs, "z", domain="com.microsoft", num_heads=num_heads,
        unidirectional=int(causal), mask_filter_value=lowest,
    )  # fmt: skip
    g.project_out(z, weights, masked)
    return g.model("attnserve_mha", d_model, masked, {"": 18, "com.microsoft": 1}, ORT_IR_VERSION)


def build_attention23_graph(weights: Weights, num_heads: int, causal: bool, masked: bool) -> onnx.ModelProto:
    """X·[W_Q W_K W_V] + b in one GEMM, then the ONNX opset-23 Attention op, then W_O."""
    d_model = weights["q_proj.weight"].shape[0]
    g = _GraphBuilder()
    w_qkv, b_qkv = _packed_qkv(weights, g.dtype)
    qkv = g.node(
        "Add",
        [g.node("MatMul", [INPUT, g.const("qkv_weight", w_qkv)], "qkv_matmul"), g.const("qkv_bias", b_qkv)],
        "qkv",
    )
    split = g.const("qkv_split", np.array([d_model] * 3, np.int64))
    g.nodes.append(helper.make_node("Split", [qkv, split], ["q", "k", "v"], axis=2))
    attention_inputs = ["q", "k", "v"]
    if masked:
        # onnxruntime wants attn_mask with an explicit query axis: [B, 1, 1, L] -> [B, 1, L, L].
        key_ok = g.node("Cast", [MASK], "key_ok", to=TensorProto.BOOL)
        key_ok4 = g.node("Unsqueeze", [key_ok, g.const("axes_1_2", np.array([1, 2], np.int64))], "key_ok4")
        seq = g.node(
            "Gather",
            [g.node("Shape", [INPUT], "input_shape"), g.const("seq_axis", np.array([1], np.int64))],
            "seq_len",
            axis=0,
        )
        one = g.const("one", np.array([1], np.int64))
        mask_shape = g.node("Concat", [one, one, seq, seq], "mask_shape", axis=0)
        attention_inputs.append(g.node("Expand", [key_ok4, mask_shape], "attn_mask"))
    z = g.node("Attention", attention_inputs, "z", q_num_heads=num_heads, kv_num_heads=num_heads, is_causal=int(causal))
    g.project_out(z, weights, masked)
    return g.model("attnserve_attention23", d_model, masked, {"": 23}, ATTENTION23_IR_VERSION)
