"""The KServe v2 inference envelope, checked the same way over gRPC (kserve_codec) and HTTP (http_codec):
which model, which inputs with which datatypes and shapes, which outputs; then the core's AttentionRequest."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from service.api.tensors import WIRE_DTYPES, check_shape, compute_states, dtype_name
from service.core.describe import MODEL_VERSION
from service.core.errors import InvalidInput, NotFound, shown
from service.core.limits import check_count, check_name
from service.core.types import HIDDEN_DTYPES, INPUT, MASK, OUTPUT, WEIGHTS_OUTPUT, AttentionRequest, WeightsSpec

PLATFORM = "onnxruntime_onnx"
HIDDEN_NAMES = tuple(dtype_name(dtype) for dtype in HIDDEN_DTYPES)
MASK_DTYPES = ("INT32", "INT64", "BOOL")
OUTPUT_NAMES = (OUTPUT, WEIGHTS_OUTPUT)
INPUT_NAMES = (INPUT, MASK)
MAX_PARAMETERS = 64  # per request and per tensor; we read few, but a map of millions still costs to decode
# Each input's allowed datatypes and dimension names.
INPUT_SPECS = {INPUT: (HIDDEN_NAMES, ("batch", "seq", "d_model")), MASK: (MASK_DTYPES, ("batch", "seq"))}


@dataclass
class InferCall:
    request: AttentionRequest
    outputs: tuple[str, ...]  # in the order the client listed them


@dataclass(frozen=True)
class InputHeader:
    """An input tensor's name, datatype and shape, checked: its data may be read as `dtype` in `shape`."""

    name: str
    field: str  # how error messages name it
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]


def check_model(name: str, version: str, served: str) -> None:
    """NotFound unless (name, version) is the served model; an empty version means the latest."""
    check_name("model name", name)
    check_name("model version", version)
    if name != served:
        raise NotFound(f"model {shown(name)} not found; this server serves {served!r}")
    if version not in ("", MODEL_VERSION):
        raise NotFound(f"model {served!r} version {shown(version)} not found; available versions: [{MODEL_VERSION!r}]")


def check_counts(inputs: int, outputs: int, parameters: int) -> None:
    """Counted before anything iterates them: a repeated field can carry a million entries."""
    check_count("inputs", inputs, len(INPUT_NAMES))
    check_count("outputs", outputs, len(OUTPUT_NAMES))
    check_count("parameters", parameters, MAX_PARAMETERS)


def input_header(name: str, datatype: str, shape: Sequence[int], parameters: int, seen: Iterable[str]) -> InputHeader:
    """Check one input's envelope (its data comes after): known, given once, an allowed datatype and shape."""
    field = f"input {shown(name)}"
    check_count(f"{field} parameters", parameters, MAX_PARAMETERS)
    if name in seen:
        raise InvalidInput(f"{field} given twice; each input at most once")
    if name not in INPUT_SPECS:
        raise InvalidInput(f"{field} is unknown; inputs are {INPUT!r} and optional {MASK!r}")
    allowed, dims = INPUT_SPECS[name]
    if datatype not in allowed:
        raise InvalidInput(f"{field}: datatype {shown(datatype)}; allowed {', '.join(allowed)}")
    return InputHeader(name, field, datatype, WIRE_DTYPES[datatype], check_shape(field, shape, dims))


def requested_outputs(names: Sequence[str]) -> tuple[str, ...]:
    """The outputs asked for, in the client's order; none named means `output` alone."""
    outputs = tuple(names) or (OUTPUT,)
    for name in outputs:
        if name not in OUTPUT_NAMES:
            raise InvalidInput(
                f"requested output {shown(name)} is unknown; outputs are {', '.join(map(repr, OUTPUT_NAMES))}"
            )
    if len(set(outputs)) != len(outputs):
        raise InvalidInput(f"requested outputs {list(outputs)} name one twice; ask for each at most once")
    return outputs


def infer_call(arrays: dict[str, np.ndarray], outputs: tuple[str, ...], request_id: str, wire_bytes: int) -> InferCall:
    """The core's request from checked inputs and outputs."""
    if INPUT not in arrays:
        raise InvalidInput(f"input {INPUT!r} is missing; it is required (FP32 [batch, seq, d_model])")
    weights = WeightsSpec() if WEIGHTS_OUTPUT in outputs else None
    x, output_dtype = compute_states(arrays[INPUT])
    request = AttentionRequest(
        x, arrays.get(MASK), weights, output_dtype=output_dtype, request_id=request_id, wire_bytes=wire_bytes
    )
    return InferCall(request, outputs)
