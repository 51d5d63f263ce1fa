"""The request fuzz target: a few seconds of atheris in a child, and the same property under hypothesis.

The property (tests/fuzz/fuzz_requests.py): any bytes, decoded and validated as the servicers do it, end in a
protobuf DecodeError, one of our typed errors, or an accepted request that the engine can run.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.inference import grpc_service_pb2 as k_pb
from service.api import v1_codec
from service.core.errors import InvalidInput
from tests.fuzz import fuzz_requests as target

ROOT = Path(__file__).resolve().parents[2]


def test_fuzz_target_runs_clean(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    target.write_seeds(corpus)
    # Linux carries a process's peak RSS across fork and exec, so the fuzzer starts with pytest's own peak
    # (gigabytes, after the model tests): allow 2 GiB on top of it, as libFuzzer's default does on top of nothing.
    rss_limit_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + 2048
    command = [sys.executable, "-m", "tests.fuzz.fuzz_requests", "-max_total_time=5", "-print_final_stats=1"]
    command.append(f"-rss_limit_mb={rss_limit_mb}")
    done = subprocess.run([*command, str(corpus)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", log).group(1))  # type: ignore[union-attr]
    assert runs > 100, log[-2000:]
    assert "Instrumenting service.api.kserve_codec" in log  # our modules are instrumented, not just run


def test_seeds_are_accepted_requests() -> None:
    """The corpus starts deep: each raw seed is a valid request of its API under the limits it was built for."""
    seeds = target.seeds()
    raw = {name: data[1:] for name, data in seeds.items() if name.startswith("raw_")}
    assert len(raw) == 10
    for name, data in raw.items():
        limits = target.DEFAULT_LIMITS if name.endswith("_512") else target.TINY_LIMITS
        if "kserve" in name:
            request = target.kserve_codec.infer_request_from_pb(k_pb.ModelInferRequest.FromString(data), "attention")
            request = request.request
        else:
            request = v1_codec.attend_request_from_pb(v1_pb.AttendRequest.FromString(data))
        target.check_request(request, limits)
        target.check_accepted(request, limits)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes(data: bytes) -> None:
    """Raw (even first byte) and recipe (odd) inputs alike, through the fuzzer's own entry point."""
    target.one_input(data)


# Structured messages built by hypothesis, independent of atheris's FuzzedDataProvider.
D = target.TINY_LIMITS.d_model
DIMS = st.one_of(st.sampled_from([0, 1, 2, 3, D, 6, 8, 9]), st.integers(-(2**63), 2**63 - 1))
SHAPES = st.lists(DIMS, min_size=0, max_size=4)
VALUES = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def tensor_bytes(draw: st.DrawFn, shape: list[int], itemsize: int) -> bytes:
    """The right byte count for shape (when small), sometimes off by a few; else a few random bytes."""
    count = int(np.prod(shape, dtype=object)) if shape and all(0 <= d <= 64 for d in shape) else None
    if count is None:
        return draw(st.binary(max_size=16))
    values = draw(st.lists(VALUES, min_size=1, max_size=4))
    data = np.resize(np.array(values, np.float32), count).view(np.uint8)[: count * itemsize].tobytes()
    data = data.ljust(count * itemsize, b"\1")
    return data[: len(data) + draw(st.sampled_from([0, 0, 0, -1, 1, -4]))] if draw(st.booleans()) else data + b"\0"


@st.composite
def kserve_messages(draw: st.DrawFn) -> k_pb.ModelInferRequest:
    message = k_pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["attention", "attention", "", "bert"])),
        model_version=draw(st.sampled_from(["", "1", "2"])),
    )
    hidden = [draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5, 8, 9])), D]
    raws = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["hidden_states", "attention_mask", "other"]))
        datatype = draw(st.sampled_from(["FP32", "INT32", "INT64", "BOOL", "FP16", "FP64", ""]))
        shape = draw(st.one_of(st.just(hidden[: 3 if name == "hidden_states" else 2]), SHAPES))
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        itemsize = {"INT64": 8, "FP64": 8, "BOOL": 1, "FP16": 2}.get(datatype, 4)
        if draw(st.booleans()):
            raws.append(draw(tensor_bytes(shape, itemsize)))
        else:
            tensor.contents.fp32_contents.extend(draw(st.lists(VALUES, max_size=40)))
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-2, 2), max_size=20)))
    if draw(st.booleans()):
        message.raw_input_contents.extend(raws)
    for name in draw(st.lists(st.sampled_from(["output", "attention_weights", "x"]), max_size=3)):
        message.outputs.add(name=name)
    return message


@st.composite
def v1_messages(draw: st.DrawFn) -> v1_pb.AttendRequest:
    message = v1_pb.AttendRequest(id=draw(st.text(max_size=4)))
    if draw(st.integers(0, 9)):
        dtype = draw(st.sampled_from([v1_pb.FP32, v1_pb.FP16, v1_pb.INT32, v1_pb.DATA_TYPE_UNSPECIFIED, 9]))
        shape = draw(st.one_of(st.tuples(st.integers(1, 3), st.integers(1, 9), st.just(D)).map(list), SHAPES))
        itemsize = 2 if dtype == v1_pb.FP16 else 4
        message.hidden_states.CopyFrom(v1_pb.Tensor(dtype=dtype, shape=shape, data=draw(tensor_bytes(shape, itemsize))))
        message.lengths.extend(draw(st.lists(st.integers(0, 10), max_size=4)))
        if draw(st.booleans()):
            positions = draw(st.lists(st.integers(0, 10), max_size=3))
            message.weights.CopyFrom(
                v1_pb.WeightsRequest(
                    positions=positions, average_heads=draw(st.booleans()), top_k=draw(st.integers(0, 10))
                )
            )
    return message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(kserve_messages(), v1_messages()))
def test_any_structured_message(message: k_pb.ModelInferRequest | v1_pb.AttendRequest) -> None:
    """Nearly valid messages of either API, through the same entry point (raw mode), and directly."""
    target.one_input(b"\0" + message.SerializeToString())
    if isinstance(message, k_pb.ModelInferRequest):
        target.check_kserve(message)
    else:
        target.check_v1(message)


def test_empty_states_with_lengths_build_no_mask() -> None:
    """Regression: 16 bytes of request made the v1 codec build a [batch, seq] mask of 2**31 entries (8 GiB)."""
    message = v1_pb.AttendRequest(hidden_states=v1_pb.Tensor(dtype=v1_pb.FP32, shape=[1, 2**31, 0]), lengths=[1])
    started = time.perf_counter()
    request = v1_codec.attend_request_from_pb(message)
    assert request.mask is None and time.perf_counter() - started < 0.5
    for limits in target.LIMITS:
        try:
            target.check_request(request, limits)
        except InvalidInput as error:
            assert "last dimension is 0" in str(error)
        else:
            raise AssertionError("an empty tensor was accepted")


def test_overflowing_shape_is_refused() -> None:
    """Regression: dims whose product overflowed int64 to 0 matched empty data, then numpy raised ValueError."""
    for shape in ([2**32, 2**32, 512], [2**62, 0, 2**62], [2**31, 2**31, 4]):
        message = v1_pb.AttendRequest(hidden_states=v1_pb.Tensor(dtype=v1_pb.FP32, shape=shape))
        try:
            v1_codec.attend_request_from_pb(message)
        except InvalidInput as error:
            assert "too large" in str(error), error
        else:
            raise AssertionError(f"shape {shape} accepted")
