"""Length mixes, sequence buckets and the load generator's table and JSON, without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf.message import Message

from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.inference import grpc_service_pb2 as kserve_pb
from service.api.v1_codec import tensor_to_pb
from service.core.seq_buckets import bucket_labels, parse_bounds, seq_bucket
from tests.load.loadgen import summarize
from tests.load.workload import KSERVE, V1, Api, LengthMix, Shape, build_target, hidden_states


@pytest.mark.parametrize(
    ("text", "expected"),
    [("128", {128}), ("8-12", set(range(8, 13))), ("16:3,512", {16, 512}), ("16,64,256", {16, 64, 256})],
)
def test_a_mix_draws_only_its_lengths_and_prints_as_parsed(text: str, expected: set[int]) -> None:
    mix = LengthMix.parse(text)
    drawn = mix.sample(np.random.default_rng(0), 4000)
    assert set(drawn) == expected
    assert LengthMix.parse(str(mix)) == mix


def test_weights_set_the_proportions() -> None:
    drawn = np.asarray(LengthMix.parse("16:3,512:1").sample(np.random.default_rng(0), 8000))
    assert 0.72 <= (drawn == 16).mean() <= 0.78


@pytest.mark.parametrize("text", ["", "abc", "0", "9-3", "16:0,32", "16:x", "1-2-3"])
def test_a_bad_mix_says_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="sequence lengths"):
        LengthMix.parse(text)


def test_sequence_buckets_are_named_by_their_upper_bound() -> None:
    bounds = parse_bounds("16,64")
    assert [seq_bucket(s, bounds) for s in (1, 16, 17, 64, 65)] == ["16", "16", "64", "64", "+Inf"]
    assert bucket_labels(bounds) == ["16", "64", "+Inf"]
    for bad in ("", "16,16", "0,4", "a"):
        with pytest.raises(ValueError, match="sequence buckets"):
            parse_bounds(bad)


def _answer(api: Api, output: np.ndarray) -> Message:
    if api is KSERVE:
        tensor = kserve_pb.ModelInferResponse.InferOutputTensor(name="output", datatype="FP32", shape=output.shape)
        return kserve_pb.ModelInferResponse(outputs=[tensor], raw_output_contents=[output.tobytes()])
    return v1_pb.AttendResponse(output=tensor_to_pb(output))


@pytest.mark.parametrize("api", [KSERVE, V1], ids=["kserve", "v1"])
def test_a_target_shares_one_payload_per_length_and_checks_answers(api: Api) -> None:
    expected = np.ones((1, 8, 16), np.float32)
    target = build_target(api, LengthMix.parse("8:1,24:1"), pool=32, d_model=16, reference=lambda x, w: (x, None))
    assert len(target.requests) == 32 and {r.seq for r in target.requests} == {8, 24}
    assert len({id(r.payload) for r in target.requests}) == 2
    eight = next(r for r in target.requests if r.seq == 8)
    assert eight.check is not None and eight.tokens == 8
    sent = hidden_states(Shape(1, 8, 16), seed=8)  # the reference here answers the input itself
    eight.check(_answer(api, sent))
    for wrong in (sent * 1.001, expected, np.ones((1, 9, 16), np.float32)):
        with pytest.raises(ValueError, match="answer"):
            eight.check(_answer(api, wrong))


def test_the_table_and_json_carry_every_bucket() -> None:
    result = summarize("in process", [1.0, 2.0, 30.0], 1.0, 48, 16)
    assert json.loads(json.dumps(result.to_dict()))["by_bucket"]["16"]["count"] == 3
    assert "≤16" in result.table() and result.sent == 3
