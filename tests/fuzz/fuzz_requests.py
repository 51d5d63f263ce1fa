"""Fuzz target: arbitrary bytes through both APIs' request decoding and validation, exactly as the servicers do it.

    python -m tests.fuzz.fuzz_requests [libFuzzer flags: -max_total_time=60 -runs=N CORPUS_DIR ...]

Each input is either raw bytes (first byte even) parsed as a KServe ModelInferRequest and as an attnserve.v1
AttendRequest, or (first byte odd) a recipe that a FuzzedDataProvider turns into a nearly valid message of one
API: datatypes from the accepted ones and a few that are not, dimensions around the model's limits, byte counts
around the right one, NaN/Inf, masks, lengths and weight positions near their edges. Both then go through
decode (kserve_codec.infer_request_from_pb / v1_codec.attend_request_from_pb) and core validation
(limits.check_request) under the default model's limits and under tiny ones (which random bytes can meet).

Allowed outcomes: protobuf's DecodeError, one of our typed errors (service.core.errors.ServiceError), or an accepted
request that satisfies what the engine relies on. Anything else propagates, and libFuzzer reports the crash.
No server, no onnxruntime run.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import atheris

if __name__ == "__main__":  # instrument our own modules for coverage; they must not be imported before this
    with atheris.instrument_imports(include=["service"], exclude=["service._pb"]):
        import service.api.kserve_codec
        import service.api.tensors
        import service.api.v1_codec
        import service.core.limits  # noqa: F401

import numpy as np
from google.protobuf.message import DecodeError

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.inference import grpc_service_pb2 as kserve_pb
from service.api import kserve_codec, v1_codec, v2_envelope
from service.api.tensors import WIRE_DTYPES
from service.app.settings import DEFAULT_MAX_MESSAGE_BYTES, Settings
from service.core.errors import ServiceError
from service.core.limits import Limits, check_finite, check_request, weights_answer_bytes
from service.core.types import AttentionRequest

SERVED = Settings.model_fields["model_name"].default  # "attention"
_MAX_WEIGHTS = Settings.model_fields["max_weights_seq_len"].default
# The default model (python -m model.export: d_model 512, 8 heads, max_seq_len 4096) under the default settings.
DEFAULT_LIMITS = Limits(
    d_model=512,
    num_heads=8,
    max_seq_len=4096,
    max_batch_size=Settings.model_fields["max_batch_size"].default,
    max_weights_seq_len=min(_MAX_WEIGHTS, 4096),
    max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
)
# Small enough that mutated bytes reach every check, including the output and weights size limits.
TINY_LIMITS = Limits(
    d_model=4, num_heads=2, max_seq_len=8, max_batch_size=3, max_weights_seq_len=6, max_message_bytes=256
)
LIMITS = (DEFAULT_LIMITS, TINY_LIMITS)

# Recipe vocabulary.
KSERVE_DATATYPES = ["FP32", "FP32", "FP32", "INT32", "INT64", "BOOL", "FP16", "FP64", "INT8", "BYTES", "", "fp32"]
INPUT_NAMES = ["hidden_states", "hidden_states", "attention_mask", "attention_mask", "x", ""]
OUTPUT_NAMES = ["output", "attention_weights", "attention_weights", "output ", ""]
MODEL_NAMES = [SERVED, SERVED, SERVED, SERVED, "", "other"]
VERSIONS = ["", "", "1", "2", "latest"]
V1_DTYPES = [v1_pb.FP32, v1_pb.FP32, v1_pb.FP16, v1_pb.INT32, v1_pb.DATA_TYPE_UNSPECIFIED, 7, -1]
MAX_FUZZ_ELEMENTS = 1 << 20  # tensors built from a recipe: up to 4 MiB of FP32, so runs stay fast
MAX_TYPED_VALUES = 1 << 14  # typed contents (repeated fields) built from a recipe
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e38, 65504.0, 70000.0]


def _dim_pools() -> tuple[list[int], list[list[int]]]:
    """Dimensions around the limits: any axis, and per axis of the hidden states (weighted towards valid)."""
    anything = [0, 1, 1, 2, 2, 3, -1, 2**31, 2**62, -(2**63), 2**63 - 1]
    batch, seq, width = [0, 1, 1, 1, 2, 2, 3], [0, 1, 1, 2, 2, 3, 5], []
    for limits in LIMITS:
        batch += [limits.max_batch_size, limits.max_batch_size + 1]
        seq += [limits.max_weights_seq_len, limits.max_weights_seq_len + 1, limits.max_seq_len, limits.max_seq_len + 1]
        width += [limits.d_model] * 4 + [limits.d_model - 1, limits.d_model + 1]
    return anything + batch + seq + width, [batch, seq, width]


DIMS, HIDDEN_DIMS = _dim_pools()


# ---------------------------------------------------------------------------------------------------------------
# The property: decode + validate as the servicers do; typed errors only; accepted requests are sound.


def check_accepted(request: AttentionRequest, limits: Limits) -> None:
    """What the batcher and engine rely on once check_request and check_finite have passed."""
    x = request.hidden_states
    assert x.dtype == np.float32 and x.ndim == 3, (x.dtype, x.shape)
    batch, seq, width = x.shape
    assert width == limits.d_model and 1 <= seq <= limits.max_seq_len and 1 <= batch <= limits.max_batch_size
    assert np.isfinite(x).all()
    assert request.output_dtype in (np.float32, np.float16)
    assert x.size * request.output_dtype.itemsize + weights_answer_bytes(request, limits) <= limits.max_message_bytes
    if request.mask is not None:
        assert request.mask.dtype == np.int32 and request.mask.shape == (batch, seq), request.mask.shape
        assert np.isin(request.mask, (0, 1)).all()
    if request.weights is not None:
        assert seq <= limits.max_weights_seq_len
        assert all(0 <= p < seq for p in request.weights.positions or ())
        assert 0 <= request.weights.top_k <= seq


def check_kserve(message: kserve_pb.ModelInferRequest, served: str = SERVED) -> None:
    """KServeServicer._infer's decode, then DataPlane.attend's check, under every set of limits."""
    for limits in LIMITS:
        try:
            call = kserve_codec.infer_request_from_pb(message, served)
            assert call.outputs and set(call.outputs) <= set(v2_envelope.OUTPUT_NAMES)
            check_request(call.request, limits)
            check_finite(call.request.hidden_states)  # in the engine thread, before compute
        except ServiceError as error:
            assert str(error), f"{type(error).__name__} without a message"
            continue
        check_accepted(call.request, limits)


def check_v1(message: v1_pb.AttendRequest) -> None:
    """AttentionServicer._attend's decode, then DataPlane.attend's check, under every set of limits."""
    for limits in LIMITS:
        try:
            request = v1_codec.attend_request_from_pb(message)
            check_request(request, limits)
            check_finite(request.hidden_states)  # in the engine thread, before compute
        except ServiceError as error:
            assert str(error), f"{type(error).__name__} without a message"
            continue
        check_accepted(request, limits)


def check_bytes(data: bytes) -> None:
    """Raw bytes as a request of each API; a DecodeError is a fine answer to garbage."""
    try:
        kserve = kserve_pb.ModelInferRequest.FromString(data)
    except DecodeError:
        pass
    else:
        check_kserve(kserve)
        if kserve.model_name != SERVED:  # also past the model check, so that mutations reach the tensors
            check_kserve(kserve, served=kserve.model_name)
    try:
        v1 = v1_pb.AttendRequest.FromString(data)
    except DecodeError:
        pass
    else:
        check_v1(v1)


# ---------------------------------------------------------------------------------------------------------------
# Recipes: a FuzzedDataProvider's choices -> a nearly valid message.


def _shape(fdp: atheris.FuzzedDataProvider, rank: int, like: list[int]) -> list[int]:
    """`rank` dims: mostly the hidden states' own (so masks match), else from the pool around the limits."""
    dims = []
    for i in range(rank):
        choice = fdp.ConsumeIntInRange(0, 7)
        if choice < 4 and i < len(like):
            dims.append(like[i])
        elif choice < 7:
            dims.append(fdp.PickValueInList(DIMS))
        else:
            dims.append(fdp.ConsumeIntInRange(-(2**63), 2**63 - 1))
    return dims


def _elements(shape: list[int]) -> int | None:
    """Element count, or None when negative or too many to build."""
    if any(d < 0 for d in shape):
        return None
    count = math.prod(shape)
    return count if count <= MAX_FUZZ_ELEMENTS else None


def _values(fdp: atheris.FuzzedDataProvider, dtype: np.dtype, count: int, fill: str) -> np.ndarray:
    """`count` values of dtype: a fuzzed pattern tiled, mask-like 0/1 for integers, specials planted."""
    if count <= 0:
        return np.zeros(max(count, 0), dtype)
    if dtype.kind in "iub":
        pattern = np.array(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(1, 8), 0, 1), dtype)
        if fill == "wild" and fdp.ConsumeBool():
            pattern = np.array(fdp.ConsumeIntListInRange(4, -3, 3), np.int64).astype(dtype)
    else:
        pattern = np.array(fdp.ConsumeRegularFloatList(fdp.ConsumeIntInRange(1, 8)) or [0.5], np.float64)
        pattern = np.clip(pattern, -1e4, 1e4).astype(dtype)
    values = np.tile(pattern, -(-count // pattern.size))[:count]
    with np.errstate(over="ignore"):  # 1e38 and 70000 become inf in FP16: planted on purpose
        for _ in range(fdp.ConsumeIntInRange(0, 2) if dtype.kind == "f" else 0):
            values[fdp.ConsumeIntInRange(0, count - 1)] = fdp.PickValueInList(SPECIALS)
    return values


def _raw(fdp: atheris.FuzzedDataProvider, dtype: np.dtype, shape: list[int], fill: str) -> bytes:
    """Little-endian bytes for shape: mostly the exact count, sometimes a few bytes short or long."""
    count = _elements(shape)
    if count is None:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    data = _values(fdp, dtype, count, fill).tobytes()
    delta = fdp.PickValueInList([0, 0, 0, 0, -1, 1, -dtype.itemsize, dtype.itemsize, -len(data)])
    return data[: len(data) + delta] if delta <= 0 else data + bytes(delta)


def kserve_from_recipe(fdp: atheris.FuzzedDataProvider) -> kserve_pb.ModelInferRequest:
    message = kserve_pb.ModelInferRequest(
        model_name=fdp.PickValueInList(MODEL_NAMES), model_version=fdp.PickValueInList(VERSIONS), id="fuzz"
    )
    hidden = [fdp.PickValueInList(pool) for pool in HIDDEN_DIMS]
    raws: list[bytes] = []
    for _ in range(fdp.PickValueInList([1, 1, 2, 2, 2, 0, 3])):
        name = fdp.PickValueInList(INPUT_NAMES)
        datatype = fdp.PickValueInList(KSERVE_DATATYPES)
        rank = fdp.PickValueInList([3, 3, 2, 2, 1, 4, 0])
        shape = _shape(fdp, rank, hidden)
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        dtype = WIRE_DTYPES.get(datatype, np.dtype("<f8") if datatype == "FP64" else np.dtype("u1"))
        where = fdp.PickValueInList(["raw", "raw", "raw", "typed", "both", "none"])
        if where in ("raw", "both"):
            raws.append(_raw(fdp, dtype, shape, "wild"))
        if where in ("typed", "both"):
            field = kserve_codec.TYPED_CONTENTS.get(datatype, "fp64_contents" if datatype == "FP64" else "int_contents")
            count = _elements(shape) or 0
            if count > MAX_TYPED_VALUES:  # a Python list per value is slow; few values, refused for their count
                count = fdp.ConsumeIntInRange(0, 8)
            count = max(0, count + fdp.PickValueInList([0, 0, 0, -1, 1]))
            values = _values(fdp, np.dtype(np.float32) if "fp" in field else np.dtype(np.int32), count, "wild")
            if field == "bool_contents":
                values = values.astype(bool)
            getattr(tensor.contents, field).extend(values.tolist())
    raws += [b"\0" * 4] * fdp.PickValueInList([0, 0, 0, 0, 1])  # one raw entry too many, sometimes
    if raws and fdp.ConsumeIntInRange(0, 7) == 0:
        raws.pop()  # one too few
    message.raw_input_contents.extend(raws)
    for _ in range(fdp.PickValueInList([0, 0, 1, 1, 2, 3])):
        message.outputs.add(name=fdp.PickValueInList(OUTPUT_NAMES))
    return message


def v1_from_recipe(fdp: atheris.FuzzedDataProvider) -> v1_pb.AttendRequest:
    message = v1_pb.AttendRequest(id="fuzz")
    if fdp.ConsumeIntInRange(0, 15):
        dtype_code = fdp.PickValueInList(V1_DTYPES)
        hidden = [fdp.PickValueInList(pool) for pool in HIDDEN_DIMS]
        shape = _shape(fdp, fdp.PickValueInList([3, 3, 3, 2, 4, 0]), hidden)
        dtype = v1_codec.DTYPES.get(dtype_code, np.dtype("<f4"))
        message.hidden_states.CopyFrom(v1_pb.Tensor(dtype=dtype_code, shape=shape, data=_raw(fdp, dtype, shape, "")))
        batch = shape[0] if shape and 0 <= shape[0] <= 64 else 1
        seq = shape[1] if len(shape) > 1 and 0 <= shape[1] < 2**32 else 1
        if fdp.ConsumeBool():
            count = max(0, batch + fdp.PickValueInList([0, 0, 0, -1, 1]))
            edges = [0, 1, seq, seq, max(seq - 1, 0), seq + 1, 2**32 - 1]
            message.lengths.extend(fdp.PickValueInList(edges) % 2**32 for _ in range(count))
        if fdp.ConsumeBool():
            edges = [0, 1, max(seq - 1, 0), seq, seq + 1, 2**32 - 1]
            positions = [fdp.PickValueInList(edges) % 2**32 for _ in range(fdp.PickValueInList([0, 0, 1, 2, 3]))]
            message.weights.CopyFrom(
                v1_pb.WeightsRequest(
                    positions=positions,
                    average_heads=fdp.ConsumeBool(),
                    top_k=fdp.PickValueInList([0, 0, 1, 2, seq, seq + 1, 2**32 - 1]) % 2**32,
                )
            )
    return message


def one_input(data: bytes) -> None:
    """The fuzz target: even first byte, raw protobuf bytes follow; odd, a recipe for a structured message."""
    if not data or data[0] % 2 == 0:
        check_bytes(data[1:])
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    if data[0] % 4 == 1:
        message = kserve_from_recipe(fdp)
        check_kserve(message)
    else:
        message = v1_from_recipe(fdp)
        check_v1(message)
    # The same message through the wire: serialising and parsing it changes nothing the checks see.
    check_bytes(message.SerializeToString())


def seeds() -> dict[str, bytes]:
    """Valid requests of both APIs (raw mode) and a few recipes: where the fuzzer starts."""
    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    for limits in LIMITS:
        d = limits.d_model
        x = rng.standard_normal((2, 3, d), dtype=np.float32)
        mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
        kserve = kserve_pb.ModelInferRequest(model_name=SERVED, id="seed")
        kserve.inputs.add(name="hidden_states", datatype="FP32", shape=x.shape)
        kserve.inputs.add(name="attention_mask", datatype="INT32", shape=mask.shape)
        kserve.raw_input_contents.extend([x.tobytes(), mask.tobytes()])
        out[f"kserve_masked_{d}"] = kserve.SerializeToString()
        kserve.outputs.add(name="output")
        kserve.outputs.add(name="attention_weights")
        out[f"kserve_weights_{d}"] = kserve.SerializeToString()
        typed = kserve_pb.ModelInferRequest(model_name=SERVED, model_version="1")
        tensor = typed.inputs.add(name="hidden_states", datatype="FP32", shape=[1, 1, d])
        tensor.contents.fp32_contents.extend(x[0, 0].tolist())
        out[f"kserve_typed_{d}"] = typed.SerializeToString()
        v1 = v1_pb.AttendRequest(id="seed", hidden_states=v1_codec.tensor_to_pb(x), lengths=[3, 2])
        out[f"v1_lengths_{d}"] = v1.SerializeToString()
        v1.hidden_states.CopyFrom(v1_codec.tensor_to_pb(x.astype(np.float16)))
        v1.weights.CopyFrom(v1_pb.WeightsRequest(positions=[0, 2], average_heads=True, top_k=2))
        out[f"v1_fp16_weights_{d}"] = v1.SerializeToString()
    seeded = {f"raw_{name}": b"\0" + data for name, data in out.items()}
    recipes = {f"recipe_{i}": bytes([i % 4 | 1]) + bytes(rng.integers(0, 256, 64, np.uint8)) for i in range(8)}
    return seeded | recipes


def write_seeds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in seeds().items():
        (path := directory / name).write_bytes(data)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """libFuzzer's command line; without a corpus directory, the seeds come from seeds() (new inputs stay in memory)."""
    args = list(sys.argv if argv is None else argv)
    if not any(not arg.startswith("-") for arg in args[1:]) and not any(a.startswith("-seed_inputs=") for a in args):
        paths = write_seeds(Path(tempfile.gettempdir()) / "attnserve-fuzz-seeds")
        args.append("-seed_inputs=" + ",".join(map(str, paths)))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
