"""KServe v2 ModelInfer* messages <-> the core's AttentionRequest / AttentionResult, and the model's metadata."""

from __future__ import annotations

import numpy as np

from service._pb.inference import grpc_service_pb2 as pb
from service._pb.inference import model_config_pb2 as config_pb
from service.api.tensors import array_from_bytes, dtype_name
from service.api.v2_envelope import (
    INPUT_NAMES,
    PLATFORM,
    InferCall,
    InputHeader,
    check_counts,
    check_model,
    infer_call,
    input_header,
    requested_outputs,
)
from service.core.describe import MODEL_VERSION, ModelDescription
from service.core.errors import InvalidInput
from service.core.limits import check_count, check_name
from service.core.types import INPUT, MASK, OUTPUT, WEIGHTS_OUTPUT, AttentionResult
from service.observe.stats import Duration, ModelStats

# The typed InferTensorContents field of each datatype we accept.
TYPED_CONTENTS = {"FP32": "fp32_contents", "INT32": "int_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}


def _input_array(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, header: InputHeader) -> np.ndarray:
    field, shape = header.field, header.shape
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"{field}: data in both raw_input_contents and contents; send it in one of them")
        return array_from_bytes(f"{field} raw_input_contents", raw, header.dtype, shape)
    if tensor.datatype not in TYPED_CONTENTS:  # FP16 has no field in InferTensorContents
        raise InvalidInput(f"{field}: {tensor.datatype} data travels in raw_input_contents only; send it there")
    values = getattr(tensor.contents, TYPED_CONTENTS[tensor.datatype])
    count = int(np.prod(shape, dtype=np.int64))
    if len(values) != count:
        raise InvalidInput(
            f"{field}: contents.{TYPED_CONTENTS[tensor.datatype]} has {len(values)} values; shape {list(shape)} "
            f"needs {count}"
        )
    return np.asarray(values, dtype=header.dtype).reshape(shape)


def infer_request_from_pb(message: pb.ModelInferRequest, served: str) -> InferCall:
    """Decode and check the envelope; the core checks the values against the model's limits."""
    check_model(message.model_name, message.model_version, served)
    check_name("id", message.id)
    check_counts(len(message.inputs), len(message.outputs), len(message.parameters))
    check_count("raw_input_contents", len(message.raw_input_contents), len(INPUT_NAMES))
    raws = list(message.raw_input_contents)
    if raws and len(raws) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raws)} entries for {len(message.inputs)} inputs; give one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        header = input_header(tensor.name, tensor.datatype, tensor.shape, len(tensor.parameters), arrays)
        arrays[header.name] = _input_array(tensor, raws[index] if raws else None, header)
    outputs = requested_outputs([output.name for output in message.outputs])
    # The raw tensors are the message, but for its envelope (names and counts are bounded above); ByteSize would
    # walk the whole message for that (40 µs at 256 KiB).
    return infer_call(arrays, outputs, message.id, sum(map(len, raws)) if raws else message.ByteSize())


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
