"""Malformed requests over both APIs against the real server: the status code, and a message that names the field,
the value received and what is allowed. Then the server must still answer correctly.

The limits come from GetModelInfo (the session server: d_model 512, 8 heads, max_seq_len 2048, max batch 8,
max_weights_seq_len 1024, 64 MiB messages), so the cases follow the server rather than constants.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service._pb.inference import grpc_service_pb2 as k_pb
from service._pb.inference import grpc_service_pb2_grpc as k_grpc
from tests.server_process import ServerProcess

MODEL = "attention"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Limits:
    """The served model's dimensions and limits, as GetModelInfo reports them."""

    d: int
    heads: int
    max_seq: int
    max_batch: int
    max_wseq: int
    max_bytes: int


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield channel


@dataclass(frozen=True)
class Stubs:
    kserve: k_grpc.GRPCInferenceServiceStub
    v1: v1_grpc.AttentionServiceStub


@pytest.fixture(scope="module")
def stubs(channel: grpc.Channel) -> Stubs:
    return Stubs(k_grpc.GRPCInferenceServiceStub(channel), v1_grpc.AttentionServiceStub(channel))


@pytest.fixture(scope="module")
def limits(stubs: Stubs) -> Limits:
    info = stubs.v1.GetModelInfo(v1_pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    return Limits(
        info.d_model,
        info.num_heads,
        info.max_seq_len,
        info.max_batch_size,
        info.max_weights_seq_len,
        info.max_message_bytes,
    )


# ---------------------------------------------------------------------------------------------------------------
# Request builders.


def states(batch: int, seq: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, d), dtype=np.float32)


def k_input(name: str, datatype: str, shape: list[int] | tuple[int, ...]) -> k_pb.ModelInferRequest.InferInputTensor:
    return k_pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


def k_request(
    *tensors: tuple[k_pb.ModelInferRequest.InferInputTensor, bytes | None],
    outputs: tuple[str, ...] = (),
    model: str = MODEL,
    version: str = "",
    request_id: str = "",
) -> k_pb.ModelInferRequest:
    """Tensors with raw bytes (all) or typed contents (bytes None)."""
    message = k_pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    message.inputs.extend(tensor for tensor, _ in tensors)
    message.raw_input_contents.extend(raw for _, raw in tensors if raw is not None)
    message.outputs.extend(k_pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs)
    return message


def k_hidden(x: np.ndarray, datatype: str = "FP32") -> tuple[k_pb.ModelInferRequest.InferInputTensor, bytes]:
    return k_input("hidden_states", datatype, x.shape), x.tobytes()


def k_mask(mask: np.ndarray, datatype: str = "INT32") -> tuple[k_pb.ModelInferRequest.InferInputTensor, bytes]:
    return k_input("attention_mask", datatype, mask.shape), mask.tobytes()


def v1_tensor(x: np.ndarray, dtype: int = v1_pb.FP32, shape: tuple[int, ...] | None = None) -> v1_pb.Tensor:
    return v1_pb.Tensor(dtype=dtype, shape=x.shape if shape is None else shape, data=x.tobytes())


def v1_request(x: np.ndarray | v1_pb.Tensor | None, request_id: str = "", **fields: object) -> v1_pb.AttendRequest:
    tensor = v1_tensor(x) if isinstance(x, np.ndarray) else x
    return v1_pb.AttendRequest(id=request_id, hidden_states=tensor, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# The battery: one function per malformed request, returning (request, facts the message must contain).


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str  # "kserve.ModelInfer", "v1.Attend", ...
    build: Callable[[Limits], tuple[Message, tuple[str, ...]]]
    code: grpc.StatusCode


CASES: list[Case] = []


def case(name: str, rpc: str, code: grpc.StatusCode = INVALID) -> Callable:
    def register(build: Callable[[Limits], tuple[Message, tuple[str, ...]]]) -> Callable:
        CASES.append(Case(name, rpc, build, code))
        return build

    return register


INFER, ATTEND = "kserve.ModelInfer", "v1.Attend"


# dtypes
@case("kserve-hidden-FP64", INFER)
def _(m: Limits):
    x = states(1, 2, m.d).astype(np.float64)
    return k_request(k_hidden(x, "FP64")), ("'hidden_states'", "datatype 'FP64'", "allowed FP32")


@case("kserve-hidden-INT8", INFER)
def _(m: Limits):
    x = np.ones((1, 2, m.d), np.int8)
    return k_request(k_hidden(x, "INT8")), ("'hidden_states'", "datatype 'INT8'", "allowed FP32")


@case("kserve-hidden-BYTES", INFER)
def _(m: Limits):
    return k_request((k_input("hidden_states", "BYTES", [1, 1, 1]), b"\3\0\0\0abc")), ("'BYTES'", "allowed FP32")


@case("v1-dtype-UNSPECIFIED", ATTEND)
def _(m: Limits):
    tensor = v1_tensor(states(1, 2, m.d), dtype=v1_pb.DATA_TYPE_UNSPECIFIED)
    return v1_request(tensor), ("hidden_states.dtype", "DATA_TYPE_UNSPECIFIED", "allowed FP32, FP16")


@case("v1-dtype-INT32", ATTEND)
def _(m: Limits):
    tensor = v1_tensor(np.ones((1, 2, m.d), np.int32), dtype=v1_pb.INT32)
    return v1_request(tensor), ("hidden_states.dtype", "INT32", "allowed FP32, FP16")


@case("v1-dtype-unknown-enum-value", ATTEND)
def _(m: Limits):
    tensor = v1_tensor(states(1, 2, m.d), dtype=42)
    return v1_request(tensor), ("hidden_states.dtype", "42", "allowed FP32, FP16")


# rank and dimensions
@case("kserve-rank-2", INFER)
def _(m: Limits):
    x = states(1, 2, m.d)[0]
    return k_request(k_hidden(x)), ("'hidden_states'", f"shape [2, {m.d}]", "rank 2", "[batch, seq, d_model]")


@case("v1-rank-4", ATTEND)
def _(m: Limits):
    x = states(1, 2, m.d)[None]
    return v1_request(x), ("hidden_states", f"shape [1, 1, 2, {m.d}]", "rank 4", "[batch, seq, d_model]")


@case("kserve-negative-dim", INFER)
def _(m: Limits):
    return k_request((k_input("hidden_states", "FP32", [1, -2, m.d]), b"")), (f"[1, -2, {m.d}]", "≥ 0")


@case("v1-shape-overflowing-int64", ATTEND)
def _(m: Limits):
    tensor = v1_pb.Tensor(dtype=v1_pb.FP32, shape=[2**32, 2**32, m.d])
    return v1_request(tensor), ("hidden_states", f"[4294967296, 4294967296, {m.d}]", "at most 2147483648")


@case("kserve-d_model-half", INFER)
def _(m: Limits):
    x = states(1, 2, m.d // 2)
    return k_request(k_hidden(x)), ("hidden_states", f"last dimension is {m.d // 2}", f"d_model is {m.d}")


@case("v1-d_model-plus-1", ATTEND)
def _(m: Limits):
    return v1_request(states(1, 2, m.d + 1)), ("hidden_states", f"last dimension is {m.d + 1}", f"d_model is {m.d}")


@case("kserve-seq-0", INFER)
def _(m: Limits):
    x = states(1, 0, m.d)
    return k_request(k_hidden(x)), ("hidden_states", "sequence length 0", f"allowed 1..{m.max_seq}")


@case("v1-seq-over-max", ATTEND)
def _(m: Limits):
    x = states(1, m.max_seq + 1, m.d)
    return v1_request(x), ("hidden_states", f"sequence length {m.max_seq + 1}", f"allowed 1..{m.max_seq}")


@case("kserve-seq-over-max", INFER)
def _(m: Limits):
    x = states(1, m.max_seq + 1, m.d)
    return k_request(k_hidden(x)), ("hidden_states", f"sequence length {m.max_seq + 1}", f"allowed 1..{m.max_seq}")


@case("kserve-batch-0", INFER)
def _(m: Limits):
    x = states(0, 3, m.d)
    return k_request(k_hidden(x)), ("hidden_states", "batch size 0", f"allowed 1..{m.max_batch}")


@case("v1-batch-over-max", ATTEND)
def _(m: Limits):
    x = states(m.max_batch + 1, 1, m.d)
    return v1_request(x), ("hidden_states", f"batch size {m.max_batch + 1}", f"allowed 1..{m.max_batch}")


@case("v1-empty-states-with-lengths", ATTEND)
def _(m: Limits):
    # Once a few bytes that made the codec build a [1, 2**31] mask (8 GiB) before anything refused them.
    tensor = v1_pb.Tensor(dtype=v1_pb.FP32, shape=[1, 2**31, 0])
    return v1_request(tensor, lengths=[1]), ("hidden_states", "last dimension is 0", f"d_model is {m.d}")


# byte counts and envelopes
@case("kserve-raw-bytes-short", INFER)
def _(m: Limits):
    x = states(1, 2, m.d)
    tensor, raw = k_hidden(x)
    need = x.nbytes
    return k_request((tensor, raw[:-4])), ("raw_input_contents", f"{need - 4} bytes received", f"needs {need}")


@case("v1-raw-bytes-long", ATTEND)
def _(m: Limits):
    x = states(1, 2, m.d)
    tensor = v1_pb.Tensor(dtype=v1_pb.FP32, shape=x.shape, data=x.tobytes() + b"\0\0\0\0")
    return v1_request(tensor), ("hidden_states.data", f"{x.nbytes + 4} bytes received", f"needs {x.nbytes}")


@case("v1-fp16-bytes-as-fp32", ATTEND)
def _(m: Limits):
    x = states(1, 2, m.d).astype(np.float16)
    tensor = v1_pb.Tensor(dtype=v1_pb.FP32, shape=x.shape, data=x.tobytes())
    return v1_request(tensor), ("hidden_states.data", f"{x.nbytes} bytes received", "of FP32", f"needs {2 * x.nbytes}")


@case("kserve-raw-count-not-inputs", INFER)
def _(m: Limits):
    message = k_request(k_hidden(states(1, 2, m.d)))
    message.raw_input_contents.append(b"\1\0\0\0")
    return message, ("raw_input_contents has 2 entries for 1 inputs", "one per input")


@case("kserve-raw-and-typed", INFER)
def _(m: Limits):
    x = states(1, 1, m.d)
    tensor, raw = k_hidden(x)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return k_request((tensor, raw)), ("'hidden_states'", "both raw_input_contents and contents", "one of them")


@case("kserve-typed-count-wrong", INFER)
def _(m: Limits):
    tensor = k_input("hidden_states", "FP32", [1, 1, m.d])
    tensor.contents.fp32_contents.extend([0.5] * 5)
    return k_request((tensor, None)), ("contents.fp32_contents has 5 values", f"shape [1, 1, {m.d}]", f"needs {m.d}")


@case("kserve-missing-hidden", INFER)
def _(m: Limits):
    return k_request(k_mask(np.ones((1, 2), np.int32))), ("'hidden_states' is missing", "FP32 [batch, seq, d_model]")


@case("v1-missing-hidden", ATTEND)
def _(m: Limits):
    return v1_pb.AttendRequest(id="x"), ("hidden_states: missing", "[batch, seq, d_model]", "FP32 or FP16")


@case("kserve-unknown-input", INFER)
def _(m: Limits):
    x = states(1, 2, m.d)
    message = k_request(k_hidden(x), (k_input("token_ids", "INT32", [1, 2]), b"\0" * 8))
    return message, ("'token_ids' is unknown", "'hidden_states'", "'attention_mask'")


@case("kserve-duplicate-input", INFER)
def _(m: Limits):
    x = states(1, 2, m.d)
    return k_request(k_hidden(x), k_hidden(x)), ("'hidden_states' given twice", "at most once")


# masks and lengths
@case("kserve-mask-wrong-shape", INFER)
def _(m: Limits):
    x = states(1, 4, m.d)
    message = k_request(k_hidden(x), k_mask(np.ones((1, 3), np.int32)))
    return message, ("attention_mask", "shape [1, 3]", "[batch, seq] = [1, 4]")


@case("kserve-mask-rank-1", INFER)
def _(m: Limits):
    x = states(1, 4, m.d)
    message = k_request(k_hidden(x), k_mask(np.ones(4, np.int32)))
    return message, ("'attention_mask'", "shape [4]", "rank 1", "[batch, seq]")


@case("kserve-mask-value-2", INFER)
def _(m: Limits):
    mask = np.array([[1, 1, 2, 0]], np.int32)
    message = k_request(k_hidden(states(1, 4, m.d)), k_mask(mask))
    return message, ("attention_mask", "value 2", "index [0, 2]", "allowed 0 (padding) or 1 (real token)")


@case("kserve-mask-value-minus-1-INT64", INFER)
def _(m: Limits):
    mask = np.array([[1, -1]], np.int64)
    message = k_request(k_hidden(states(1, 2, m.d)), k_mask(mask, "INT64"))
    return message, ("attention_mask", "value -1", "allowed 0 (padding) or 1")


@case("kserve-mask-FP32", INFER)
def _(m: Limits):
    message = k_request(k_hidden(states(1, 2, m.d)), k_mask(np.ones((1, 2), np.float32), "FP32"))
    return message, ("'attention_mask'", "datatype 'FP32'", "allowed INT32, INT64, BOOL")


@case("v1-lengths-count", ATTEND)
def _(m: Limits):
    return v1_request(states(2, 4, m.d), lengths=[4, 4, 4]), ("lengths", "3 entries for batch 2", "one per sequence")


@case("v1-length-over-seq", ATTEND)
def _(m: Limits):
    return v1_request(states(2, 4, m.d), lengths=[4, 9]), ("lengths[1]", "9", "allowed 0..4")


# attention weights
@case("v1-weights-position-out-of-range", ATTEND)
def _(m: Limits):
    request = v1_request(states(1, 4, m.d), weights=v1_pb.WeightsRequest(positions=[0, 4]))
    return request, ("weights.positions", "4 is out of range", "allowed 0..3")


@case("v1-weights-top_k-over-seq", ATTEND)
def _(m: Limits):
    request = v1_request(states(1, 4, m.d), weights=v1_pb.WeightsRequest(top_k=5))
    return request, ("weights.top_k: 5", "allowed 0 (full rows) .. 4")


@case("v1-weights-over-max_weights_seq_len", ATTEND)
def _(m: Limits):
    seq = m.max_wseq + 1
    request = v1_request(states(1, seq, m.d), weights=v1_pb.WeightsRequest(positions=[0]))
    return request, ("attention weights", f"sequence length {seq}", f"max_weights_seq_len {m.max_wseq}")


@case("kserve-weights-over-max_weights_seq_len", INFER)
def _(m: Limits):
    seq = m.max_wseq + 1
    message = k_request(k_hidden(states(1, seq, m.d)), outputs=("output", "attention_weights"))
    return message, ("attention weights", f"sequence length {seq}", f"max_weights_seq_len {m.max_wseq}")


@case("v1-weights-over-message-size", ATTEND)
def _(m: Limits):
    # Full per-head rows of the whole batch: batch × heads × seq × seq FP32 over the message limit.
    seq = m.max_wseq
    batch = min(m.max_batch, max(1, -(-m.max_bytes // (m.heads * seq * seq * 4)) + 1))
    nbytes = batch * m.heads * seq * seq * 4
    if nbytes <= m.max_bytes:
        pytest.skip("this server's message limit holds every weights answer")
    request = v1_request(states(batch, seq, m.d), weights=v1_pb.WeightsRequest())
    answer = nbytes + batch * seq * m.d * 4  # the output travels in the same answer
    return request, ("attention weights", f"would be {answer} bytes", f"max message size {m.max_bytes}")


@case("v1-output-and-weights-over-message-size", ATTEND)
def _(m: Limits):
    # Weights that fit the limit alone, with an output that takes the answer past it: sized before computing.
    seq = m.max_wseq
    batch = m.max_bytes // (m.heads * seq * seq * 4)
    if not 1 <= batch <= m.max_batch:
        pytest.skip("no batch of this server's weights answer fits the message limit alone")
    answer = batch * m.heads * seq * seq * 4 + batch * seq * m.d * 4
    request = v1_request(states(batch, seq, m.d), weights=v1_pb.WeightsRequest())
    return request, ("output and attention weights", f"would be {answer} bytes", f"max message size {m.max_bytes}")


# values
@case("kserve-NaN", INFER)
def _(m: Limits):
    x = states(1, 3, m.d)
    x[0, 1, 7] = np.nan
    return k_request(k_hidden(x)), ("hidden_states", "non-finite", "[0, 1, 7]", "only finite values allowed")


@case("v1-plus-Inf", ATTEND)
def _(m: Limits):
    x = states(2, 3, m.d)
    x[1, 2, 0] = np.inf
    return v1_request(x), ("hidden_states", "non-finite", "[1, 2, 0]", "only finite values allowed")


@case("v1-FP16-Inf", ATTEND)
def _(m: Limits):
    x = states(1, 2, m.d).astype(np.float16)
    x[0, 0, 3] = -np.inf
    return v1_request(v1_tensor(x, v1_pb.FP16)), ("hidden_states", "non-finite", "[0, 0, 3]", "only finite")


# Finite values whose attention overflows: Q·Kᵀ past float32 (NaN out), or an FP16 answer past 65504.
OVERFLOW = ("hidden_states", "output is not finite", "float32 overflow", "largest |value| in the input is 1e+30")


@case("kserve-output-overflows-float32", INFER)
def _(m: Limits):
    return k_request(k_hidden(np.full((1, 3, m.d), 1e30, np.float32))), (*OVERFLOW, "scale the input down")


@case("v1-output-overflows-float32", ATTEND)
def _(m: Limits):
    return v1_request(np.full((2, 3, m.d), 1e30, np.float32)), (*OVERFLOW, "scale the input down")


@case("v1-FP16-output-over-65504", ATTEND)
def _(m: Limits):
    x = np.full((1, 3, m.d), 6e4, np.float16)  # finite in FP16, but the attention output is larger
    return v1_request(v1_tensor(x, v1_pb.FP16)), ("hidden_states", "beyond FP16's largest 65504", "send FP32")


# outputs
@case("kserve-unknown-output", INFER)
def _(m: Limits):
    message = k_request(k_hidden(states(1, 2, m.d)), outputs=("logits",))
    return message, ("output 'logits' is unknown", "'output', 'attention_weights'")


@case("kserve-duplicate-output", INFER)
def _(m: Limits):
    message = k_request(k_hidden(states(1, 2, m.d)), outputs=("output", "output"))
    return message, ("['output', 'output']", "name one twice", "at most once")


# models and versions
@case("kserve-unknown-model", INFER, NOT_FOUND)
def _(m: Limits):
    message = k_request(k_hidden(states(1, 2, m.d)), model="bert")
    return message, ("model 'bert' not found", f"serves '{MODEL}'")


@case("kserve-unknown-version", INFER, NOT_FOUND)
def _(m: Limits):
    message = k_request(k_hidden(states(1, 2, m.d)), version="2")
    return message, (f"model '{MODEL}' version '2' not found", "available versions: ['1']")


@case("kserve-metadata-unknown-model", "kserve.ModelMetadata", NOT_FOUND)
def _(m: Limits):
    return k_pb.ModelMetadataRequest(name="bert"), ("model 'bert' not found", f"'{MODEL}'")


@case("kserve-metadata-unknown-version", "kserve.ModelMetadata", NOT_FOUND)
def _(m: Limits):
    return k_pb.ModelMetadataRequest(name=MODEL, version="7"), ("version '7' not found", "['1']")


@case("kserve-config-unknown-model", "kserve.ModelConfig", NOT_FOUND)
def _(m: Limits):
    return k_pb.ModelConfigRequest(name="bert", version="1"), ("model 'bert' not found", f"'{MODEL}'")


@case("kserve-ready-unknown-model", "kserve.ModelReady", NOT_FOUND)
def _(m: Limits):
    return k_pb.ModelReadyRequest(name=""), ("model '' not found", f"'{MODEL}'")


@case("kserve-statistics-unknown-model", "kserve.ModelStatistics", NOT_FOUND)
def _(m: Limits):
    return k_pb.ModelStatisticsRequest(name="bert"), ("model 'bert' not found", f"'{MODEL}'")


# transport
@case("kserve-over-max-message-size", INFER, grpc.StatusCode.RESOURCE_EXHAUSTED)
def _(m: Limits):
    tensor = k_input("hidden_states", "FP32", [1, 1, m.d])
    return k_request((tensor, bytes(m.max_bytes))), ("larger than max", f"vs. {m.max_bytes}")


@case("v1-over-max-message-size", ATTEND, grpc.StatusCode.RESOURCE_EXHAUSTED)
def _(m: Limits):
    tensor = v1_pb.Tensor(dtype=v1_pb.FP32, shape=[1, 1, m.d], data=bytes(m.max_bytes))
    return v1_request(tensor), ("larger than max", f"vs. {m.max_bytes}")


def call(stubs: Stubs, rpc: str, request: Message) -> tuple[grpc.StatusCode, str]:
    api, method = rpc.split(".")
    try:
        getattr(getattr(stubs, api), method)(request, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_battery_is_large_and_covers_both_apis() -> None:
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names) >= 30
    assert sum(c.rpc == INFER for c in CASES) >= 15 and sum(c.rpc == ATTEND for c in CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_request(case: Case, stubs: Stubs, limits: Limits) -> None:
    request, facts = case.build(limits)
    started = time.monotonic()
    code, message = call(stubs, case.rpc, request)
    assert code not in NEVER, f"{case.name}: a client's mistake answered {code.name}: {message}"
    assert code == case.code, f"{case.name}: got {code.name}: {message}"
    missing = [fact for fact in facts if fact not in message]
    assert not missing, f"{case.name}: message {message!r} lacks {missing}"
    assert time.monotonic() - started < 30, f"{case.name}: a refusal should be quick"


# ---------------------------------------------------------------------------------------------------------------
# Positive controls: the other mask dtypes are accepted and mean the same as INT32.


@pytest.fixture(scope="module")
def reference(served_model: Path) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    config, weights = read_model_dir(served_model)

    def run(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return reference_attention(weights, config["num_heads"], x, mask, config["causal"])[0]

    return run


def k_output(response: k_pb.ModelInferResponse, name: str = "output") -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(tuple(tensor.shape))


def v1_output(response: v1_pb.AttendResponse) -> np.ndarray:
    assert response.output.dtype == v1_pb.FP32
    return np.frombuffer(response.output.data, np.float32).reshape(tuple(response.output.shape))


@pytest.mark.parametrize("datatype", ["BOOL", "INT64", "INT32"])
def test_mask_dtypes_accepted(datatype: str, stubs: Stubs, limits: Limits, reference: Callable) -> None:
    x = states(2, 5, limits.d, seed=3)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    wire = mask.astype({"BOOL": np.bool_, "INT64": np.int64, "INT32": np.int32}[datatype])
    response = stubs.kserve.ModelInfer(k_request(k_hidden(x), k_mask(wire, datatype)), timeout=TIMEOUT_S)
    assert relative_l2(k_output(response), reference(x, mask)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Streams: a bad request gets an error answer of its own, and the stream goes on.


def test_kserve_stream_answers_bad_then_good(stubs: Stubs, limits: Limits, reference: Callable) -> None:
    x = states(1, 4, limits.d, seed=5)
    bad_x = states(1, 4, limits.d // 2)
    requests = [
        k_request(k_hidden(bad_x), request_id="bad-d_model"),
        k_request(k_hidden(x), model="bert", request_id="bad-model"),
        k_request(k_hidden(x), request_id="good"),
    ]
    responses = list(stubs.kserve.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))
    by_id = {r.infer_response.id: r for r in responses}
    assert sorted(by_id) == ["bad-d_model", "bad-model", "good"]
    assert f"last dimension is {limits.d // 2}" in by_id["bad-d_model"].error_message
    assert f"d_model is {limits.d}" in by_id["bad-d_model"].error_message
    assert "model 'bert' not found" in by_id["bad-model"].error_message
    good = by_id["good"]
    assert good.error_message == ""
    assert relative_l2(k_output(good.infer_response), reference(x, None)) <= 1e-5


def test_attend_stream_answers_bad_then_good(stubs: Stubs, limits: Limits, reference: Callable) -> None:
    x = states(2, 3, limits.d, seed=6)
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    requests = [
        v1_request(nan, request_id="bad-nan"),
        v1_request(x, request_id="bad-lengths", lengths=[3]),
        v1_request(x, request_id="good", lengths=[3, 2]),
    ]
    responses = list(stubs.v1.AttendStream(iter(requests), timeout=TIMEOUT_S))
    by_id = {r.id: r for r in responses}
    assert sorted(by_id) == ["bad-lengths", "bad-nan", "good"]
    for name, fact in (("bad-nan", "non-finite"), ("bad-lengths", "1 entries for batch 2")):
        answer = by_id[name]
        assert answer.WhichOneof("result") == "error"
        assert answer.error.code == INVALID.value[0], answer.error
        assert fact in answer.error.message, answer.error.message
    good = by_id["good"]
    assert good.WhichOneof("result") == "response"
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    assert relative_l2(v1_output(good.response), reference(x, mask)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# After all of that, the server still answers correctly on both APIs (this runs after the battery: file order).


def test_still_serves_correct_answers(stubs: Stubs, limits: Limits, reference: Callable) -> None:
    x = states(3, 17, limits.d, seed=11)
    lengths = np.array([17, 9, 1])
    mask = (np.arange(17)[None, :] < lengths[:, None]).astype(np.int32)
    expected = reference(x, mask)
    kserve = k_output(stubs.kserve.ModelInfer(k_request(k_hidden(x), k_mask(mask)), timeout=TIMEOUT_S))
    v1 = v1_output(stubs.v1.Attend(v1_request(x, lengths=lengths.tolist()), timeout=TIMEOUT_S))
    assert relative_l2(kserve, expected) <= 1e-5
    assert relative_l2(v1, expected) <= 1e-5
    assert relative_l2(kserve, v1) <= 1e-5
    ready = stubs.kserve.ServerReady(k_pb.ServerReadyRequest(), timeout=TIMEOUT_S)
    assert ready.ready
