"""KServe v2 over HTTP/REST: JSON bodies, with Triton's binary tensor data extension, <-> InferCall and
AttentionResult; and the JSON of metadata, config and statistics, made from the same messages gRPC answers.

Binary data: the body is a JSON header of Inference-Header-Content-Length bytes, then the raw little-endian
bytes of each input whose parameters carry `binary_data_size`, in the order of `inputs`. An answer's outputs go
back the same way when asked for (`binary_data` on the output, or `binary_data_output` on the request).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from service.api.tensors import array_from_bytes, dtype_name
from service.api.v2_envelope import (
    InferCall,
    InputHeader,
    check_counts,
    check_model,
    infer_call,
    input_header,
    requested_outputs,
)
from service.core.describe import MODEL_VERSION
from service.core.errors import InvalidInput, TooLarge, shown
from service.core.limits import check_name
from service.core.types import OUTPUT, AttentionResult

HEADER_LENGTH = "Inference-Header-Content-Length"
# A JSON number costs Python about 16 times its text (a float object and a list slot for "0,"): JSON text is held
# to max_message_bytes / JSON_EXPANSION, so a body's objects fit where its binary form would.
JSON_EXPANSION = 16
JSON_BYTES_PER_VALUE = 24  # an FP32 value written as JSON text, at most (a double's repr and a comma)
# numpy kinds each datatype's JSON values may parse as: numbers for floats, integers for ints, true/false for BOOL.
JSON_KINDS = {"FP32": "fiu", "FP16": "fiu", "INT32": "iu", "INT64": "iu", "BOOL": "b"}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64}
_INT64 |= {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


@dataclass
class HttpInfer:
    call: InferCall
    binary: dict[str, bool]  # per requested output: raw bytes after the JSON header, or JSON data
    timeout_s: float | None  # Triton's `timeout` parameter (microseconds), if given


def parse_json(field: str, text: bytes | memoryview) -> dict[str, Any]:
    try:
        value = json.loads(bytes(text))
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise InvalidInput(f"{field} is not valid JSON ({str(e)[:200]}); send a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} is JSON {type(value).__name__}; send a JSON object")
    return value


def _typed(field: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"{field} is {_json_type(value)}; it must be {what}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _params(field: str, holder: Mapping[str, Any]) -> dict[str, Any]:
    return _typed(f"{field} parameters", holder.get("parameters", {}), dict, "an object")


def _json_array(header: InputHeader, data: Any) -> np.ndarray:
    field = header.field
    _typed(f"{field} data", data, list, "an array of values, flat or nested, row-major")
    try:
        parsed = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise InvalidInput(f"{field}: data is not a regular (nested) array; send it flat, row-major") from None
    count = math.prod(header.shape)
    if parsed.size != count:
        raise InvalidInput(f"{field}: data has {parsed.size} values; shape {list(header.shape)} needs {count}")
    if parsed.size and parsed.dtype.kind not in JSON_KINDS[header.datatype]:
        raise InvalidInput(f"{field}: data holds {parsed.dtype.kind!r}-kind values, not {header.datatype} values")
    if parsed.dtype.kind in "iu" and header.dtype.kind == "i" and parsed.size:
        info = np.iinfo(header.dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidInput(f"{field}: data has values outside {header.datatype}'s range")
    return parsed.astype(header.dtype).reshape(header.shape)


def infer_request_from_http(
    body: bytes, header_length: str | None, served: str, name: str, version: str, max_json_bytes: int
) -> HttpInfer:
    """Decode and check a POST .../infer body; the core checks the values against the model's limits."""
    check_model(name, version, served)
    view = memoryview(body)
    json_end = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} {shown(header_length)}: must be a byte count within the body's {len(body)} bytes"
            )
        json_end = int(header_length)
    if json_end > max_json_bytes:
        raise TooLarge(
            f"JSON part of the request is {json_end} bytes; at most {max_json_bytes} allowed; send tensors as "
            f"binary data (binary_data_size parameters and {HEADER_LENGTH})"
        )
    message = parse_json("the request", view[:json_end])
    request_id = _typed("id", message.get("id", ""), str, "a string")
    check_name("id", request_id)
    inputs = _typed("inputs", message.get("inputs"), list, "an array of input tensors")
    outputs = _typed("outputs", message.get("outputs", []), list, "an array of requested outputs")
    parameters = _params("request", message)
    check_counts(len(inputs), len(outputs), len(parameters))

    arrays: dict[str, np.ndarray] = {}
    offset = json_end
    for tensor in inputs:
        tensor = _typed("each input", tensor, dict, "an object")
        shape = _typed("input shape", tensor.get("shape"), list, "an array of integers")
        for dim in shape:
            _typed("each input shape dimension", dim, int, "an integer")
        tensor_params = _params("input", tensor)
        header = input_header(
            _typed("input name", tensor.get("name"), str, "a string"),
            _typed("input datatype", tensor.get("datatype"), str, "a string"),
            shape,
            len(tensor_params),
            arrays,
        )
        if "binary_data_size" in tensor_params:
            size = _typed(f"{header.field} binary_data_size", tensor_params["binary_data_size"], int, "an integer")
            if "data" in tensor:
                raise InvalidInput(f"{header.field}: both data and binary_data_size; send it one way")
            if size < 0 or offset + size > len(body):
                raise InvalidInput(
                    f"{header.field}: binary_data_size {size} is past the {len(body) - offset} binary bytes left"
                )
            arrays[header.name] = array_from_bytes(
                f"{header.field} binary data", view[offset : offset + size], header.dtype, header.shape
            )
            offset += size
        else:
            arrays[header.name] = _json_array(header, tensor.get("data"))
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes after the last input's binary data; send none")

    default_binary = _typed("binary_data_output", parameters.get("binary_data_output", False), bool, "a boolean")
    given: list[str] = []
    binary: dict[str, bool] = {}
    for output in outputs:
        output = _typed("each output", output, dict, "an object")
        given.append(_typed("output name", output.get("name"), str, "a string"))
        flag = _params("output", output).get("binary_data", default_binary)
        binary[given[-1]] = _typed("binary_data", flag, bool, "a boolean")
    names = requested_outputs(given)
    binary = {name: binary.get(name, default_binary) for name in names}
    timeout_us = _typed("timeout", parameters.get("timeout", 0), int, "an integer (microseconds)")
    call = infer_call(arrays, names, request_id, len(body))
    return HttpInfer(call, binary, timeout_us * 1e-6 if timeout_us > 0 else None)


def check_json_answer(infer: HttpInfer, num_heads: int, max_bytes: int) -> None:
    """Refuse, before computing it, an answer whose JSON text would pass max_bytes: it goes as binary data."""
    request = infer.call.request
    for name, binary in infer.binary.items():
        if binary:
            continue
        count = request.hidden_states.size if name == OUTPUT else request.batch_size * num_heads * request.seq_len**2
        if count * JSON_BYTES_PER_VALUE > max_bytes:
            raise InvalidInput(
                f"output {name!r} as JSON would be about {count * JSON_BYTES_PER_VALUE} bytes, over the max message "
                f'size {max_bytes}; ask for it as binary data (parameters: {{"binary_data": true}})'
            )


def infer_response_to_http(infer: HttpInfer, result: AttentionResult, served: str) -> tuple[bytes, list[np.ndarray]]:
    """(the JSON header, the arrays whose bytes follow it in order); no arrays: the JSON is the whole answer."""
    outputs: list[dict[str, Any]] = []
    binaries: list[np.ndarray] = []
    for name in infer.call.outputs:
        # attention_weights is asked for only with a WeightsSpec, so its result carries weights
        array = result.output if name == OUTPUT else result.weights.values  # type: ignore[union-attr]
        entry: dict[str, Any] = {"name": name, "datatype": dtype_name(array.dtype), "shape": list(array.shape)}
        if infer.binary[name]:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            binaries.append(np.ascontiguousarray(array))
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    answer = {"model_name": served, "model_version": MODEL_VERSION, "id": infer.call.request.request_id}
    return json.dumps({**answer, "outputs": outputs}).encode(), binaries


def proto_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP endpoints write it: protobuf JSON with the proto's field names and every field,
    but 64-bit integers as JSON numbers (protobuf's JSON makes them strings; perf_analyzer reads numbers)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, data)


def _numbers(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                inner = entry.fields_by_name["value"].message_type
                if inner is not None:
                    data[field.name] = {k: _numbers(inner, v) for k, v in value.items()}
            elif isinstance(value, list):
                data[field.name] = [_numbers(entry, v) for v in value]
            elif isinstance(value, dict):
                data[field.name] = _numbers(entry, value)
    return data
