"""Export the torch module's plain path (MatMul + Softmax) to ONNX with dynamic batch and seq axes."""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from model.attention import AttentionConfig, MultiHeadAttention
from model.fused_graphs import INPUT, MASK, OUTPUT
from model.weights import PARAM_NAMES, Weights

WEIGHTS_OUTPUT = "attention_weights"


def build_module(weights: Weights, config: AttentionConfig) -> MultiHeadAttention:
    module = MultiHeadAttention(config).eval()
    state = {name: torch.from_numpy(np.ascontiguousarray(weights[name])) for name in PARAM_NAMES}
    module.load_state_dict(state, strict=True)
    return module


class _Unmasked(torch.nn.Module):
    def __init__(self, attention: MultiHeadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attention(hidden_states)[0]


class _Masked(_Unmasked):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # export wants a mask
        return self.attention(hidden_states, attention_mask)[0]


class _MaskedWithWeights(_Unmasked):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]  # export: weights too
        out, weights = self.attention(hidden_states, attention_mask, need_weights=True)
        return out, weights


def export_plain(
    module: MultiHeadAttention, path: Path, *, masked: bool, with_weights: bool = False, opset: int = 18
) -> None:
    """Trace the manual path (the one that reads like the formula) and save a self-contained .onnx."""
    module.use_fast_path = False
    d = module.config.d_model
    example_x = torch.randn(2, 5, d)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    if with_weights:
        wrapper: torch.nn.Module = _MaskedWithWeights(module)
    elif masked:
        wrapper = _Masked(module)
    else:
        wrapper = _Unmasked(module)
    args: tuple[torch.Tensor, ...] = (example_x,)
    dynamic: dict[str, dict[int, object]] = {"hidden_states": {0: batch, 1: seq}}
    input_names, output_names = [INPUT], [OUTPUT]
    if masked or with_weights:
        args += (torch.ones(2, 5, dtype=torch.int32),)
        dynamic["attention_mask"] = {0: batch, 1: seq}
        input_names.append(MASK)
    if with_weights:
        output_names.append(WEIGHTS_OUTPUT)
    # The exporter is chatty (progress lines, warnings about axis names and torchvision);
    # the CLI prints one line per step instead.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            verbose=False,
        )
        assert program is not None, "torch.onnx.export with dynamo returns its program"
        program.save(str(path), external_data=False)
    module.use_fast_path = True
