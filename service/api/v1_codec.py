"""attnserve.v1 messages <-> numpy and the core's types. The client uses the same Tensor codec."""

from __future__ import annotations

import numpy as np

from service import __version__
from service._pb.attnserve.v1 import attention_pb2 as pb
from service.api.tensors import WIRE_DTYPES, array_from_bytes, check_shape, compute_states
from service.core.describe import MODEL_VERSION, ModelDescription
from service.core.errors import InvalidInput
from service.core.limits import check_count, check_name
from service.core.types import HIDDEN_DTYPES, AttentionRequest, AttentionResult, WeightsSpec

# attnserve.v1.DataType <-> numpy.
DTYPES: dict[int, np.dtype] = {
    pb.FP32: WIRE_DTYPES["FP32"],
    pb.FP16: WIRE_DTYPES["FP16"],
    pb.INT32: WIRE_DTYPES["INT32"],
}
HIDDEN_CODES = tuple(code for code, dtype in DTYPES.items() if dtype in HIDDEN_DTYPES)


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> pb.Tensor:
    """Write `array` into a Tensor field in place (building a Tensor and assigning it would copy the bytes again)."""
    little = array.dtype.newbyteorder("<")
    dtype = next((code for code, dt in DTYPES.items() if dt == little), None)
    if dtype is None:
        raise TypeError(f"{array.dtype} cannot travel as an attnserve.v1 Tensor; use float32, float16 or int32")
    tensor.dtype = dtype  # type: ignore[assignment]  # the stubs type the enum field as DataType, not int
    tensor.shape[:] = array.shape
    tensor.data = np.ascontiguousarray(array, little).tobytes()
    return tensor


def tensor_to_pb(array: np.ndarray) -> pb.Tensor:
    return fill_tensor(pb.Tensor(), array)


def tensor_from_pb(field: str, tensor: pb.Tensor, names: tuple[str, ...], allowed: tuple[int, ...]) -> np.ndarray:
    """A read-only view of the tensor's bytes, after checking dtype, rank and byte count."""
    if tensor.dtype not in allowed:
        got = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
        raise InvalidInput(f"{field}.dtype: {got}; allowed {', '.join(pb.DataType.Name(code) for code in allowed)}")
    shape = check_shape(field, tensor.shape, names)
    return array_from_bytes(f"{field}.data", tensor.data, DTYPES[tensor.dtype], shape)


def attend_request_from_pb(message: pb.AttendRequest) -> AttentionRequest:
    check_name("id", message.id)
    if not message.HasField("hidden_states"):
        raise InvalidInput("hidden_states: missing; send a Tensor [batch, seq, d_model] of FP32 or FP16")
    x = tensor_from_pb("hidden_states", message.hidden_states, ("batch", "seq", "d_model"), HIDDEN_CODES)
    x, output_dtype = compute_states(x)
    batch, seq, _ = x.shape
    mask = None
    if message.lengths:
        if len(message.lengths) != batch:  # counted before reading: it may carry a million entries
            raise InvalidInput(
                f"lengths: {len(message.lengths)} entries for batch {batch}; give one per sequence or none"
            )
        lengths = np.asarray(message.lengths, dtype=np.int64)
        if (lengths > seq).any():
            index = int(np.argmax(lengths > seq))
            raise InvalidInput(f"lengths[{index}]: {int(lengths[index])}; allowed 0..{seq} (the sequence length)")
        # An empty tensor (a zero dimension) is refused by check_request; building its [batch, seq] mask could
        # cost gigabytes for a few bytes of request (shape [1, 2**31, 0]), so it gets none.
        if x.size:
            mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    weights = None
    if message.HasField("weights"):
        spec = message.weights
        check_count("weights.positions", len(spec.positions), seq)  # each position at most once
        positions = tuple(int(p) for p in spec.positions) or None
        weights = WeightsSpec(positions, spec.average_heads, int(spec.top_k))
    return AttentionRequest(
        x, mask, weights, output_dtype=output_dtype, request_id=message.id, wire_bytes=message.ByteSize()
    )


def attend_response_to_pb(request: AttentionRequest, result: AttentionResult) -> pb.AttendResponse:
    response = pb.AttendResponse(id=request.request_id, graph=result.graph)
    response.timing.queue_us = round(result.timing.queue_s * 1e6)
    response.timing.compute_us = round(result.timing.compute_s * 1e6)
    response.timing.total_us = round(result.timing.total_s * 1e6)
    fill_tensor(response.output, result.output)
    if result.weights is not None:
        w = result.weights
        response.weights.positions.extend(w.positions)
        response.weights.averaged = w.averaged
        fill_tensor(response.weights.values, w.values)
        if w.indices is not None:
            fill_tensor(response.weights.indices, w.indices)
    return response


def model_info_to_pb(name: str, model: ModelDescription) -> pb.ModelInfo:
    limits = model.limits
    routes = [pb.Route(masked=r.masked, up_to=r.up_to, graph=r.graph, form=r.form) for r in model.routes]
    return pb.ModelInfo(
        name=name,
        version=MODEL_VERSION,
        d_model=model.d_model,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        causal=model.causal,
        input_dtypes=HIDDEN_CODES,  # type: ignore[arg-type]  # enum values as ints, as protobuf accepts them
        max_seq_len=limits.max_seq_len,
        max_batch_size=limits.max_batch_size,
        max_weights_seq_len=limits.max_weights_seq_len,
        max_message_bytes=limits.max_message_bytes,
        provider=model.provider,
        routes=routes,
        weights=pb.WeightsSource(kind=model.weights_kind, sha256=model.weights_sha256, detail=model.weights_detail),
        server_version=__version__,
    )
