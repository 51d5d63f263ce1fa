"""KServe v2 ModelInfer* messages <-> the core's AttentionRequest / AttentionResult, and the model's metadata."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service._pb.inference import grpc_service_pb2 as pb
from service._pb.inference import model_config_pb2 as config_pb
from service.api.tensors import WIRE_DTYPES, array_from_bytes, check_shape, compute_states, dtype_name
from service.core.describe import MODEL_VERSION, ModelDescription
from service.core.errors import InvalidInput, NotFound, shown
from service.core.limits import check_count, check_name
from service.core.types import (
    HIDDEN_DTYPES,
    INPUT,
    MASK,
    OUTPUT,
    WEIGHTS_OUTPUT,
    AttentionRequest,
    AttentionResult,
    WeightsSpec,
)
from service.observe.stats import Duration, ModelStats

PLATFORM = "onnxruntime_onnx"
HIDDEN_NAMES = tuple(dtype_name(dtype) for dtype in HIDDEN_DTYPES)
MASK_DTYPES = ("INT32", "INT64", "BOOL")
OUTPUT_NAMES = (OUTPUT, WEIGHTS_OUTPUT)
INPUT_NAMES = (INPUT, MASK)
MAX_PARAMETERS = 64  # per request and per tensor; we read none, but a map of millions still costs to decode
# The typed InferTensorContents field of each datatype we accept.
TYPED_CONTENTS = {"FP32": "fp32_contents", "INT32": "int_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}


def check_model(name: str, version: str, served: str) -> None:
    """NotFound unless (name, version) is the served model; an empty version means the latest."""
    check_name("model name", name)
    check_name("model version", version)
    if name != served:
        raise NotFound(f"model {shown(name)} not found; this server serves {served!r}")
    if version not in ("", MODEL_VERSION):
        raise NotFound(f"model {served!r} version {shown(version)} not found; available versions: [{MODEL_VERSION!r}]")


@dataclass
class InferCall:
    request: AttentionRequest
    outputs: tuple[str, ...]  # in the order the client listed them


def _input_array(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, allowed: tuple[str, ...], names: tuple[str, ...]
) -> np.ndarray:
    field = f"input {shown(tensor.name)}"
    if tensor.datatype not in allowed:
        raise InvalidInput(f"{field}: datatype {shown(tensor.datatype)}; allowed {', '.join(allowed)}")
    dtype = WIRE_DTYPES[tensor.datatype]
    shape = check_shape(field, tensor.shape, names)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"{field}: data in both raw_input_contents and contents; send it in one of them")
        return array_from_bytes(f"{field} raw_input_contents", raw, dtype, shape)
    if tensor.datatype not in TYPED_CONTENTS:  # FP16 has no field in InferTensorContents
        raise InvalidInput(f"{field}: {tensor.datatype} data travels in raw_input_contents only; send it there")
    values = getattr(tensor.contents, TYPED_CONTENTS[tensor.datatype])
    count = int(np.prod(shape, dtype=np.int64))
    if len(values) != count:
        raise InvalidInput(
            f"{field}: contents.{TYPED_CONTENTS[tensor.datatype]} has {len(values)} values; shape {list(shape)} "
            f"needs {count}"
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def infer_request_from_pb(message: pb.ModelInferRequest, served: str) -> InferCall:
    """Decode and check the envelope; the core checks the values against the model's limits."""
    check_model(message.model_name, message.model_version, served)
    check_name("id", message.id)
    # Counted before anything iterates them: a repeated field can carry a million entries.
    check_count("inputs", len(message.inputs), len(INPUT_NAMES))
    check_count("outputs", len(message.outputs), len(OUTPUT_NAMES))
    check_count("raw_input_contents", len(message.raw_input_contents), len(INPUT_NAMES))
    check_count("parameters", len(message.parameters), MAX_PARAMETERS)
    raws = list(message.raw_input_contents)
    if raws and len(raws) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raws)} entries for {len(message.inputs)} inputs; give one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        check_count(f"input {shown(tensor.name)} parameters", len(tensor.parameters), MAX_PARAMETERS)
        if tensor.name in arrays:
            raise InvalidInput(f"input {shown(tensor.name)} given twice; each input at most once")
        raw = raws[index] if raws else None
        if tensor.name == INPUT:
            arrays[INPUT] = _input_array(tensor, raw, HIDDEN_NAMES, ("batch", "seq", "d_model"))
        elif tensor.name == MASK:
            arrays[MASK] = _input_array(tensor, raw, MASK_DTYPES, ("batch", "seq"))
        else:
            raise InvalidInput(f"input {shown(tensor.name)} is unknown; inputs are {INPUT!r} and optional {MASK!r}")
    if INPUT not in arrays:
        raise InvalidInput(f"input {INPUT!r} is missing; it is required (FP32 [batch, seq, d_model])")

    outputs = tuple(output.name for output in message.outputs) or (OUTPUT,)
    for name in outputs:
        if name not in OUTPUT_NAMES:
            raise InvalidInput(
                f"requested output {shown(name)} is unknown; outputs are {', '.join(map(repr, OUTPUT_NAMES))}"
            )
    if len(set(outputs)) != len(outputs):
        raise InvalidInput(f"requested outputs {list(outputs)} name one twice; ask for each at most once")
    weights = WeightsSpec() if WEIGHTS_OUTPUT in outputs else None
    x, output_dtype = compute_states(arrays[INPUT])
    # The raw tensors are the message, but for its envelope (names and counts are bounded above); ByteSize would
    # walk the whole message for that (40 µs at 256 KiB).
    wire_bytes = sum(map(len, raws)) if raws else message.ByteSize()
    request = AttentionRequest(
        x, arrays.get(MASK), weights, output_dtype=output_dtype, request_id=message.id, wire_bytes=wire_bytes
    )
    return InferCall(request, outputs)


def infer_response_to_pb(call: InferCall, result: AttentionResult, served: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=served, model_version=MODEL_VERSION, id=call.request.request_id)
    for name in call.outputs:
        # attention_weights is asked for only with a WeightsSpec, so its result carries weights
        array = result.output if name == OUTPUT else result.weights.values  # type: ignore[union-attr]
        response.outputs.add(name=name, datatype=dtype_name(array.dtype), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def model_metadata(served: str, d_model: int) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=served,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[
            tensor(name=INPUT, datatype="FP32", shape=[-1, -1, d_model]),
            tensor(name=MASK, datatype="INT32", shape=[-1, -1]),
        ],
        # attention_weights is left out on purpose: perf_analyzer (and other generic clients) request every
        # output the metadata lists, which would turn every benchmark into a [batch, heads, seq, seq] weights
        # run. ModelConfig's parameters describe it, and any client that names it in `outputs` gets it.
        outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, -1, d_model])],
    )


def model_config(served: str, model: ModelDescription) -> pb.ModelConfigResponse:
    """Triton's ModelConfig: dims exclude the batch dimension because max_batch_size > 0. `dynamic_batching`
    is there when the server batches (more than one sequence per run); its queue policy gives the request bound.
    Our token, padding and wait bounds have no Triton field: `parameters` names them."""
    fp32 = config_pb.TYPE_FP32
    group = config_pb.ModelInstanceGroup
    config = config_pb.ModelConfig(
        name=served,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=model.limits.max_batch_size,
        input=[
            config_pb.ModelInput(name=INPUT, data_type=fp32, dims=[-1, model.d_model]),
            config_pb.ModelInput(name=MASK, data_type=config_pb.TYPE_INT32, dims=[-1], optional=True),
        ],
        # Like the metadata, lists only `output` (perf_analyzer requires the two to agree); the weights output
        # is described in `parameters` and served to clients that name it.
        output=[config_pb.ModelOutput(name=OUTPUT, data_type=fp32, dims=[-1, model.d_model])],
        parameters={
            "optional_outputs": config_pb.ModelParameter(
                string_value=f"{WEIGHTS_OUTPUT}: FP32 [batch, {model.num_heads}, seq, seq], returned when named in "
                "outputs"
            )
        },
        instance_group=[
            group(kind=group.KIND_GPU if model.provider == "cuda" else group.KIND_CPU, count=model.instances)
        ],
    )
    batching = model.batching
    if batching.max_sequences > 1:
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        config.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_requests
        config.parameters["dynamic_batching"].string_value = batching.summary
    return pb.ModelConfigResponse(config=config)


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(served: str, stats: ModelStats) -> pb.ModelStatisticsResponse:
    """Triton's ModelStatistics: real counts and nanoseconds of the work done."""
    inference = pb.InferStatistics(
        success=_duration(stats.success),
        fail=_duration(stats.fail),
        queue=_duration(stats.queue),
        compute_input=_duration(stats.compute_input),
        compute_infer=_duration(stats.compute_infer),
        compute_output=_duration(stats.compute_output),
    )
    batches = [
        pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(duration))
        for size, duration in sorted(stats.compute_by_batch.items())
    ]
    model = pb.ModelStatistics(
        name=served,
        version=MODEL_VERSION,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=inference,
        batch_stats=batches,
    )
    return pb.ModelStatisticsResponse(model_stats=[model])
