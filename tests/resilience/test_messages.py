"""Messages built to hurt: huge repeated fields and strings, bytes that are not the message they claim to be,
and finite inputs whose answer would overflow."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service._pb.inference import grpc_service_pb2 as k_pb
from service._pb.inference import grpc_service_pb2_grpc as k_grpc
from service.api.v1_codec import tensor_to_pb
from tests.resilience.harness import (
    CHANNEL_OPTIONS,
    D_MODEL,
    MIB,
    case,
    check_after,
    code_name,
    identity,
    observe,
    output_error,
    running,
    states,
    watching,
)

pytestmark = pytest.mark.resilience

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.name
OK = grpc.StatusCode.OK.name
MODEL = "attention"


def _k_request(x: np.ndarray, model: str = MODEL, input_name: str = "hidden_states", request_id: str = "") -> Message:
    request = k_pb.ModelInferRequest(model_name=model, id=request_id, raw_input_contents=[x.tobytes()])
    request.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
    return request


# ---------------------------------------------------------------------------------------------------------------
# repeated_fields_and_strings

MILLION = 1_000_000
CONTROL = "".join(map(chr, range(1, 32)))  # valid UTF-8, but nothing a log line should carry
LOG_GROWTH_BOUND = MIB
STRINGS_RSS_BOUND_MIB = 300


def _hostile_requests() -> dict[str, tuple[str, Message]]:
    """name -> (rpc, request); every one must be refused with INVALID_ARGUMENT and a short message."""
    x = states((1, 16, D_MODEL), seed=5)
    many_dims = v1_pb.Tensor(dtype=v1_pb.FP32, shape=[1] * MILLION, data=x.tobytes())
    positions = v1_pb.WeightsRequest(positions=[i % 16 for i in range(MILLION)])  # every one in range
    huge_id = (CONTROL * (20 * MIB // len(CONTROL) + 1))[: 20 * MIB]
    return {
        "v1 shape of 1,000,000 dims": ("v1", v1_pb.AttendRequest(hidden_states=many_dims)),
        "v1 1,000,000 weights positions": ("v1", v1_pb.AttendRequest(hidden_states=tensor_to_pb(x), weights=positions)),
        "v1 id of 20 MB of control characters": ("v1", v1_pb.AttendRequest(id=huge_id, hidden_states=tensor_to_pb(x))),
        "kserve id of 20 MB of control characters": ("kserve", _k_request(x, request_id=huge_id)),
        "kserve model name of 1 MB": ("kserve", _k_request(x, model="m" * MIB)),
        "kserve tensor name of 1 MB": ("kserve", _k_request(x, input_name="h" * MIB)),
    }


def test_repeated_fields_and_strings(served_model: Path) -> None:
    requests = _hostile_requests()
    attack = "; ".join(requests) + " (--access-log all)"
    with case("repeated_fields_and_strings", attack) as result, running(served_model, "--access-log", "all") as server:
        access_before, log_before = len(server.access_lines), len(server.log_lines)
        with (
            watching(server, served_model, abort_above_mib=1024) as watch,
            grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel,
        ):
            calls: dict[str, Callable[..., Message]] = {
                "v1": v1_grpc.AttentionServiceStub(channel).Attend,
                "kserve": k_grpc.GRPCInferenceServiceStub(channel).ModelInfer,
            }
            for name, (rpc, request) in requests.items():
                try:
                    calls[rpc](request, timeout=30)
                    code, details = OK, ""
                except grpc.RpcError as error:
                    code, details = code_name(error), str(error.details())
                result.codes[code] += 1
                result.figures[name] = f"{code}, message {len(details)} B: {details[:80]!r}"
                result.expect(f"{name}: INVALID_ARGUMENT", code == INVALID_ARGUMENT, f"{code}: {details[:100]!r}")
                result.expect(f"{name}: message < 1 KiB", len(details) < 1024, f"{len(details)} B")
            time.sleep(1.0)  # the access log is flushed twice a second
        observe(result, watch, STRINGS_RSS_BOUND_MIB)
        result.checks.append(check_after(server, served_model))
        access = sum(len(line) for line in list(server.access_lines)[access_before:])
        log = sum(len(line) for line in server.log_lines[log_before:])
        result.figures["access log (stdout) growth"] = f"{access} B"
        result.figures["server log (stderr) growth"] = f"{log} B"
        result.expect("access log grows < 1 MiB", access < LOG_GROWTH_BOUND, f"{access} B")
        result.expect("server log grows < 1 MiB", log < LOG_GROWTH_BOUND, f"{log} B")


# ---------------------------------------------------------------------------------------------------------------
# undecodable_messages

# Field 1 of AttendRequest (`id`) and field 3 of ModelInferRequest (`id`) are proto3 strings: invalid UTF-8 in
# them makes the whole message undecodable.
V1_BAD_ID = b"\x0a\x02\xff\xfe"
KSERVE_BAD_ID = b"\x1a\x02\xff\xfe"
STREAM_GOOD_BEFORE, STREAM_GOOD_AFTER = 6, 2


def _stream(method: grpc.StreamStreamMultiCallable, messages: list[bytes]) -> tuple[str, list[Message]]:
    """Send every message, read every answer; (final code, answers)."""
    answers: list[Message] = []
    try:
        for answer in method(iter(messages), timeout=30):
            answers.append(answer)
        return OK, answers
    except grpc.RpcError as error:
        return code_name(error), answers


def test_undecodable_messages(served_model: Path) -> None:
    x = states((1, 16, D_MODEL), seed=6)
    good = v1_pb.AttendRequest(id="good", hidden_states=tensor_to_pb(x)).SerializeToString()
    k_good = _k_request(x, request_id="good").SerializeToString()
    count = STREAM_GOOD_BEFORE + STREAM_GOOD_AFTER
    attack = (
        "unary Attend with invalid UTF-8 in `id`; AttendStream and ModelStreamInfer each carrying "
        f"{STREAM_GOOD_BEFORE} good requests, one undecodable, {STREAM_GOOD_AFTER} good"
    )
    with case("undecodable_messages", attack) as result, running(served_model) as server:
        with (
            watching(server, served_model, abort_above_mib=1024) as watch,
            grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel,
        ):
            invalid_before = server.metric("attnserve_requests_total", code=INVALID_ARGUMENT)
            attend = channel.unary_unary(
                "/attnserve.v1.AttentionService/Attend", request_serializer=identity, response_deserializer=identity
            )
            try:
                attend(good + V1_BAD_ID, timeout=30)
                code = OK
            except grpc.RpcError as error:
                code = code_name(error)
            result.codes[f"unary {code}"] += 1
            invalid_added = server.metric("attnserve_requests_total", code=INVALID_ARGUMENT) - invalid_before
            result.figures["INVALID_ARGUMENT counted"] = f"+{invalid_added:g}"
            result.expect("unary INVALID_ARGUMENT", code == INVALID_ARGUMENT, code)
            result.expect("counted once as INVALID_ARGUMENT", invalid_added == 1, f"+{invalid_added:g}")

            v1_stream = channel.stream_stream(
                "/attnserve.v1.AttentionService/AttendStream",
                request_serializer=identity,
                response_deserializer=v1_pb.AttendStreamResponse.FromString,
            )
            sent = [good] * STREAM_GOOD_BEFORE + [good + V1_BAD_ID] + [good] * STREAM_GOOD_AFTER
            code, answers = _stream(v1_stream, sent)
            errors = [a.error.code for a in answers if a.WhichOneof("result") == "error"]
            outputs = [a.response for a in answers if a.WhichOneof("result") == "response"]
            worst = max((output_error(served_model, x, r) for r in outputs), default=np.inf)
            result.codes[f"AttendStream {code}"] += 1
            result.codes.update(f"AttendStream error answer {c}" for c in errors)
            result.figures["AttendStream answers"] = (
                f"{len(outputs)} good (worst relative L2 {worst:.1e}), errors {errors}"
            )
            result.expect("AttendStream ends OK", code == OK, code)
            result.expect(
                f"AttendStream: {count} correct answers and one error 3",
                len(outputs) == count and worst <= 1e-5 and errors == [3],
                f"{len(outputs)} answers, errors {errors}",
            )

            k_stream = channel.stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer",
                request_serializer=identity,
                response_deserializer=k_pb.ModelStreamInferResponse.FromString,
            )
            sent = [k_good] * STREAM_GOOD_BEFORE + [k_good + KSERVE_BAD_ID] + [k_good] * STREAM_GOOD_AFTER
            code, answers = _stream(k_stream, sent)
            failed = [a.error_message for a in answers if a.error_message]
            good_answers = [a for a in answers if not a.error_message and a.infer_response.raw_output_contents]
            result.codes[f"ModelStreamInfer {code}"] += 1
            result.codes.update("ModelStreamInfer error answer" for _ in failed)
            result.figures["ModelStreamInfer answers"] = f"{len(good_answers)} good, errors {[m[:80] for m in failed]}"
            result.expect("ModelStreamInfer ends OK", code == OK, code)
            result.expect(
                f"ModelStreamInfer: {count} answers and one error",
                len(good_answers) == count and len(failed) == 1,
                f"{len(good_answers)} answers, {len(failed)} errors",
            )
        observe(result, watch, 100)
        result.checks.append(check_after(server, served_model))


# ---------------------------------------------------------------------------------------------------------------
# output_overflow


def _outcome(data: bytes) -> str:
    """What an answer amounts to: OK, or OK carrying NaN or Inf (the failure this case looks for)."""
    return OK if np.isfinite(np.frombuffer(data, np.float32)).all() else "OK with non-finite output"


def test_output_overflow(served_model: Path) -> None:
    x = np.full((1, 16, D_MODEL), 1e30, np.float32)  # finite, but the projections and Q·Kᵀ overflow
    attack = "every input value 1e30 (finite) on Attend, ModelInfer and AttendStream"
    with case("output_overflow", attack) as result, running(served_model) as server:
        with (
            watching(server, served_model, abort_above_mib=1024) as watch,
            grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel,
        ):
            v1 = v1_grpc.AttentionServiceStub(channel)
            k = k_grpc.GRPCInferenceServiceStub(channel)
            request = v1_pb.AttendRequest(id="overflow", hidden_states=tensor_to_pb(x))
            codes: dict[str, str] = {}
            try:
                codes["Attend"] = _outcome(v1.Attend(request, timeout=30).output.data)
            except grpc.RpcError as error:
                codes["Attend"] = code_name(error)
            try:
                codes["ModelInfer"] = _outcome(k.ModelInfer(_k_request(x), timeout=30).raw_output_contents[0])
            except grpc.RpcError as error:
                codes["ModelInfer"] = code_name(error)
            for answer in v1.AttendStream(iter([request]), timeout=30):
                if answer.WhichOneof("result") == "error":
                    codes["AttendStream"] = f"error answer {answer.error.code}"
                else:
                    codes["AttendStream"] = _outcome(answer.response.output.data)
        result.codes.update(f"{rpc} {code}" for rpc, code in codes.items())
        for rpc, expected in (
            ("Attend", INVALID_ARGUMENT),
            ("ModelInfer", INVALID_ARGUMENT),
            ("AttendStream", "error answer 3"),
        ):
            result.expect(f"{rpc} {expected}", codes.get(rpc) == expected, str(codes.get(rpc)))
        observe(result, watch, 100)
        result.checks.append(check_after(server, served_model))
