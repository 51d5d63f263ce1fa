"""Requests that cost the server memory out of proportion: many big ones at once, a gzip bomb, and
attention weights of every position of a full batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service.api.v1_codec import tensor_to_pb
from tests.resilience.harness import (
    CHANNEL_OPTIONS,
    D_MODEL,
    MAX_RELATIVE_L2,
    MIB,
    case,
    check_after,
    code_name,
    identity,
    observe,
    poll,
    running,
    states,
    watching,
)

pytestmark = pytest.mark.resilience

ATTEND = "/attnserve.v1.AttentionService/Attend"
OK = grpc.StatusCode.OK.name
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.name
CANCELLED_BY_ATTACKER = "still open at the end (cancelled)"


def _call_all(
    method: grpc.UnaryUnaryMultiCallable, requests: list[bytes], until: float, stop: threading.Event, **kwargs: object
) -> list[str]:
    """Every request at once (futures on one channel); the code of each. Calls still open at `until` (monotonic)
    or once `stop` is set are cancelled and reported as such."""
    futures = [method.future(request, timeout=max(1.0, until - time.monotonic()), **kwargs) for request in requests]
    poll(lambda: stop.is_set() or all(f.done() for f in futures), until - time.monotonic())
    codes = []
    for future in futures:
        if not future.done():
            future.cancel()
            codes.append(CANCELLED_BY_ATTACKER)
            continue
        try:
            future.result()
            codes.append(OK)
        except grpc.RpcError as error:
            codes.append(code_name(error))
    return codes


# ---------------------------------------------------------------------------------------------------------------
# memory_budget

BUDGET_MIB = 512
MESSAGE_MIB = 17  # --max-message-bytes: room for one (8,1024,512) FP32 request; calls at once = 512 / 17 = 30
BUDGET_CONCURRENT = 16  # fewer than the 30 call slots, so the victim finds one: the budget is what refuses
# A fixed count, not a time: RSS grew with every further round on this machine (+1022..1135 MiB after one, +1278
# after two, +1300 after three; not explained yet: allocator fragmentation or gRPC's buffers), so a time bound
# made it depend on the machine's speed.
BUDGET_ROUNDS = 1
# Admitted requests hold the budget; calls not yet admitted hold their message as it arrives (gRPC's buffers, the
# bytes handed to us, the decoded message: about 3 copies); onnxruntime's buffers for two engine threads' runs
# of (8,1024) come on top (~390 MiB measured for two such calls alone on this machine).
BUDGET_RSS_BOUND_MIB = BUDGET_MIB + BUDGET_CONCURRENT * 3 * 16 // 2 + 400


def test_memory_budget(served_model: Path) -> None:
    x = states((8, 1024, D_MODEL), seed=3)
    request = v1_pb.AttendRequest(id="big", hidden_states=tensor_to_pb(x)).SerializeToString()
    attack = (
        f"rounds of {BUDGET_CONCURRENT} concurrent (8,1024,512) FP32 Attend calls (16 MiB each) for "
        f"{BUDGET_ROUNDS} rounds; --memory-budget-mb {BUDGET_MIB} --max-message-bytes {MESSAGE_MIB} MiB"
    )
    with (
        case("memory_budget", attack) as result,
        running(
            served_model, "--memory-budget-mb", str(BUDGET_MIB), "--max-message-bytes", str(MESSAGE_MIB * MIB)
        ) as server,
    ):
        rounds = 0
        with (
            watching(server, served_model, abort_above_mib=2 * BUDGET_RSS_BOUND_MIB) as watch,
            grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel,
        ):
            attend = channel.unary_unary(ATTEND, request_serializer=identity, response_deserializer=identity)
            while rounds < BUDGET_ROUNDS and not watch.sampler.exceeded.is_set():
                until = time.monotonic() + 30
                result.codes.update(_call_all(attend, [request] * BUDGET_CONCURRENT, until, watch.sampler.exceeded))
                rounds += 1
        result.figures["rounds"] = str(rounds)
        observe(result, watch, BUDGET_RSS_BOUND_MIB)
        result.checks.append(check_after(server, served_model))
        result.expect(
            "OK or RESOURCE_EXHAUSTED, at least one of each",
            set(result.codes) == {OK, RESOURCE_EXHAUSTED},
            str(dict(result.codes)),
        )


# ---------------------------------------------------------------------------------------------------------------
# compression_bomb

BOMB_LIMIT_BYTES = 8 * MIB
BOMB_BYTES = 64 * MIB  # eight times the limit once inflated; about 64 KiB on the wire
BOMBS = 8
BOMB_RSS_BOUND_MIB = 48


def test_compression_bomb(served_model: Path) -> None:
    zeros = v1_pb.Tensor(dtype=v1_pb.FP32, shape=[8, BOMB_BYTES // (8 * 4 * D_MODEL), D_MODEL], data=bytes(BOMB_BYTES))
    request = v1_pb.AttendRequest(id="bomb", hidden_states=zeros).SerializeToString()
    attack = (
        f"{BOMBS} gzip Attend requests of {BOMB_BYTES // MIB} MiB inflated, 2 at a time; "
        f"--max-message-bytes {BOMB_LIMIT_BYTES}"
    )
    with (
        case("compression_bomb", attack) as result,
        running(served_model, "--max-message-bytes", str(BOMB_LIMIT_BYTES)) as server,
    ):
        with (
            watching(server, served_model, abort_above_mib=1024) as watch,
            grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel,
        ):
            attend = channel.unary_unary(ATTEND, request_serializer=identity, response_deserializer=identity)
            started = time.monotonic()
            until = time.monotonic() + 30
            for _ in range(BOMBS // 2):
                result.codes.update(
                    _call_all(attend, [request] * 2, until, watch.sampler.exceeded, compression=grpc.Compression.Gzip)
                )
            result.figures["seconds"] = f"{time.monotonic() - started:.1f}"
        observe(result, watch, BOMB_RSS_BOUND_MIB)
        result.checks.append(check_after(server, served_model))
        result.expect("all RESOURCE_EXHAUSTED", set(result.codes) == {RESOURCE_EXHAUSTED}, str(dict(result.codes)))


# ---------------------------------------------------------------------------------------------------------------
# weights_memory

WEIGHTS_CONCURRENT = 4
WEIGHTS_TOP_K = 4
# Unbounded, one (8,1024) weights run holds 8 sequences x 8 heads x 1024^2 FP32 probabilities = 256 MiB plus its
# top-k temporaries; four such calls grew the unfixed server past 2.4 GiB. A few sequences per run (<= 64 MiB of
# probabilities) on two engine threads: the calls' messages and outputs (~200 MiB), two runs' probabilities with
# onnxruntime's buffers and the top-k's sort (measured ~400 MiB for one run), inside this.
WEIGHTS_RSS_BOUND_MIB = 1024
WEIGHTS_SECONDS = 35.0  # one such call alone takes ~9-11 s on 2 cores; calls still open then are cancelled


def test_weights_memory(served_model: Path) -> None:
    x = states((8, 1024, D_MODEL), seed=4)
    spec = v1_pb.WeightsRequest(top_k=WEIGHTS_TOP_K)  # no positions: every one of the 1024
    request = v1_pb.AttendRequest(id="weights", hidden_states=tensor_to_pb(x), weights=spec)
    attack = (
        f"{WEIGHTS_CONCURRENT} concurrent (8,1024,512) Attend calls, weights top_k {WEIGHTS_TOP_K} of every position "
        f"(at most {WEIGHTS_SECONDS:.0f} s)"
    )
    with case("weights_memory", attack) as result, running(served_model) as server:
        with (
            watching(server, served_model, abort_above_mib=4 * WEIGHTS_RSS_BOUND_MIB) as watch,
            grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel,
        ):
            attend = v1_grpc.AttentionServiceStub(channel).Attend
            started = time.monotonic()
            # Their own deadline lies past the ceiling: a call cut at the ceiling reads as such, not as a timeout.
            futures = [attend.future(request, timeout=WEIGHTS_SECONDS + 30) for _ in range(WEIGHTS_CONCURRENT)]
            stop = watch.sampler.exceeded
            poll(lambda: stop.is_set() or all(f.done() for f in futures), WEIGHTS_SECONDS, 0.05)
            result.figures["seconds"] = f"{time.monotonic() - started:.1f}"
            answers = []
            for future in futures:
                if not future.done():
                    future.cancel()
                    result.codes[CANCELLED_BY_ATTACKER] += 1
                elif future.exception() is not None:
                    result.codes[code_name(future.exception())] += 1
                else:
                    result.codes[OK] += 1
                    answers.append(future.result())
        observe(result, watch, WEIGHTS_RSS_BOUND_MIB)
        result.checks.append(check_after(server, served_model))
        # The queue's estimated-wait bound may refuse one (documented RESOURCE_EXHAUSTED); an answer too big for a
        # message (INVALID_ARGUMENT) or none in time is a failure.
        result.expect(
            "OK (or refused by the queue bound), at least one OK",
            set(result.codes) <= {OK, RESOURCE_EXHAUSTED} and result.codes[OK] >= 1,
            str(dict(result.codes)),
        )
        if answers:
            error = _top_k_error(served_model, x[:1], answers[0].weights)
            result.figures["top-k of sequence 0, relative L2"] = f"{error:.1e}"
            result.expect("top-k weights correct", error <= MAX_RELATIVE_L2, f"{error:.1e}")


def _top_k_error(model_dir: Path, x: np.ndarray, weights: v1_pb.AttentionWeights) -> float:
    """Relative L2 of the answer's top-k values of the first sequence against the reference's largest k."""
    config, model = read_model_dir(model_dir)
    probs = reference_attention(model, config["num_heads"], x)[1][0]  # [heads, seq, seq]
    expected = -np.sort(-probs, axis=-1)[..., :WEIGHTS_TOP_K]
    shape = tuple(weights.values.shape)
    if shape != (8, *expected.shape):
        return float("inf")
    return relative_l2(np.frombuffer(weights.values.data, np.float32).reshape(shape)[0], expected)
