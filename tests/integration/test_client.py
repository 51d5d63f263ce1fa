"""attnserve_client and the attnserve-client CLI against a real server, checked with the float64 numpy reference."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from attnserve_client import (
    AsyncAttentionClient,
    AttendResult,
    AttentionClient,
    StreamError,
    StreamRequest,
    WeightsQuery,
)
from attnserve_client._pb.attnserve.v1 import attention_pb2 as pb
from attnserve_client.cli import main
from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service import __version__
from tests.server_process import ServerProcess

D_MODEL, HEADS = 512, 8


@pytest.fixture(scope="module")
def weights(served_model: Path) -> dict[str, np.ndarray]:
    return read_model_dir(served_model)[1]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[AttentionClient]:
    with AttentionClient(server.address, timeout_s=30) as c:
        yield c


def _states(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, D_MODEL), dtype=np.float32)


def _reference(weights: dict[str, np.ndarray], x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    return reference_attention(weights, HEADS, x, mask)[0]


def test_info_describes_the_served_model(client: AttentionClient, served_model: Path) -> None:
    config, _ = read_model_dir(served_model)
    info = client.info()
    assert isinstance(info, pb.ModelInfo)
    assert (info.name, info.version) == ("attention", "1")
    assert (info.d_model, info.num_heads, info.head_dim, info.causal) == (512, 8, 64, False)
    assert list(info.input_dtypes) == [pb.FP32, pb.FP16]
    assert info.max_seq_len == config["max_seq_len"] == 2048
    assert info.max_batch_size >= 1 and info.max_weights_seq_len >= 1 and info.max_message_bytes > 0
    assert info.provider in ("cpu", "cuda")
    assert info.routes and all(route.graph in config["graphs"] for route in info.routes)
    assert info.weights.kind == config["weights"]["kind"]
    assert info.weights.sha256 == config["files"]["weights.npz"]
    assert info.server_version == __version__


def test_attend_matches_the_reference(client: AttentionClient, weights: dict[str, np.ndarray]) -> None:
    x = _states(2, 37)
    result = client.attend(x, request_id="parity")
    assert isinstance(result, AttendResult)
    assert result.id == "parity"
    assert result.output.shape == x.shape and result.output.dtype == np.float32
    assert relative_l2(result.output, _reference(weights, x)) <= 1e-5
    assert result.weights is None and result.weight_indices is None and result.weight_positions == ()
    assert result.graph and result.timing.total_us >= result.timing.compute_us > 0


def test_lengths_pad_rows_to_zero(client: AttentionClient, weights: dict[str, np.ndarray]) -> None:
    x = _states(3, 16, seed=1)
    lengths = [16, 9, 0]
    result = client.attend(x, np.array(lengths))  # any sequence of ints, numpy included
    for row, length in enumerate(lengths):
        assert np.all(result.output[row, length:] == 0), f"row {row}: padded positions must be zero"
        if length:
            expected = _reference(weights, x[row : row + 1, :length])
            assert relative_l2(result.output[row : row + 1, :length], expected) <= 1e-5, f"row {row}"


def test_fp16_in_fp16_out(client: AttentionClient, weights: dict[str, np.ndarray]) -> None:
    x = _states(2, 20, seed=2).astype(np.float16)
    result = client.attend(x)
    assert result.output.dtype == np.float16 and result.output.shape == x.shape
    assert relative_l2(result.output, _reference(weights, x.astype(np.float32))) <= 1e-3


def test_weights_match_the_reference_probabilities(client: AttentionClient, weights: dict[str, np.ndarray]) -> None:
    x = _states(2, 24, seed=3)
    lengths = [24, 10]
    mask = (np.arange(24)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    positions = (3, 7, 20)
    probs = reference_attention(weights, HEADS, x, mask)[1][:, :, positions, :]  # [B, H, P, S]

    per_head = client.attend(x, lengths, weights=WeightsQuery(positions=positions))
    assert per_head.weight_positions == positions and not per_head.averaged and per_head.weight_indices is None
    assert per_head.weights is not None and per_head.weights.shape == (2, HEADS, 3, 24)
    assert relative_l2(per_head.weights, probs) <= 1e-5
    assert np.all(per_head.weights[1, :, :, 10:] == 0), "padded keys get no weight"

    averaged = client.attend(x, lengths, weights=WeightsQuery(positions=positions, average_heads=True))
    assert averaged.averaged and averaged.weights is not None and averaged.weights.shape == (2, 1, 3, 24)
    assert relative_l2(averaged.weights, probs.mean(axis=1, keepdims=True)) <= 1e-5

    top = client.attend(x, lengths, weights=WeightsQuery(positions=positions, top_k=5))
    assert top.weights is not None and top.weight_indices is not None
    assert top.weights.shape == top.weight_indices.shape == (2, HEADS, 3, 5)
    assert top.weight_indices.dtype == np.int32
    assert np.all(np.diff(top.weights, axis=-1) <= 0), "top-k weights come highest first"
    expected_top = -np.sort(-probs, axis=-1)[..., :5]
    np.testing.assert_allclose(top.weights, expected_top, atol=1e-6)
    at_indices = np.take_along_axis(probs, top.weight_indices.astype(np.int64), axis=-1)
    np.testing.assert_allclose(top.weights, at_indices, atol=1e-6)

    every = client.attend(x[:1, :6], weights=WeightsQuery())  # no positions: every row, per head
    assert every.weight_positions == tuple(range(6)) and every.weights is not None
    assert every.weights.shape == (1, HEADS, 6, 6)


def test_stream_answers_every_request_by_id(client: AttentionClient, weights: dict[str, np.ndarray]) -> None:
    inputs = {f"r{i}": _states(1, 4 + 3 * i, seed=10 + i) for i in range(10)}
    requests = [StreamRequest(x, id=name) for name, x in inputs.items()]
    bad = StreamRequest(np.zeros((1, 4, D_MODEL + 1), np.float32), id="bad")
    answers = dict(client.attend_stream([*requests, bad]))
    assert set(answers) == {*inputs, "bad"}
    for name, x in inputs.items():
        answer = answers[name]
        assert isinstance(answer, AttendResult) and answer.id == name
        assert relative_l2(answer.output, _reference(weights, x)) <= 1e-5, name
    error = answers["bad"]
    assert isinstance(error, StreamError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "d_model" in error.message
    unnamed = dict(client.attend_stream(StreamRequest(_states(1, 3)) for _ in range(3)))
    assert set(unnamed) == {"0", "1", "2"}, "an empty id becomes the request's index"


def test_a_request_that_cannot_be_sent_ends_the_stream_after_the_earlier_answers(client: AttentionClient) -> None:
    requests = [StreamRequest(_states(1, 3), id="ok"), StreamRequest(np.zeros((1, 3, D_MODEL)), id="float64")]
    answers = []
    with pytest.raises(TypeError, match="float32 or float16"):
        answers.extend(client.attend_stream(requests))
    assert [name for name, _ in answers] == ["ok"]

    async def run() -> list[str]:
        names = []
        async with AsyncAttentionClient(client.target, timeout_s=30) as async_client:
            with pytest.raises(TypeError, match="float32 or float16"):
                async for name, _ in async_client.attend_stream(requests):
                    names.append(name)
        return names

    assert asyncio.run(run()) == ["ok"]


def test_async_client(server: ServerProcess, weights: dict[str, np.ndarray]) -> None:
    x = _states(2, 12, seed=4)

    async def requests() -> AsyncIterator[StreamRequest]:
        for i in range(3):
            yield StreamRequest(x, lengths=[12, 5 + i], id=f"a{i}")

    async def run() -> tuple[pb.ModelInfo, AttendResult, dict[str, AttendResult | StreamError]]:
        async with AsyncAttentionClient(server.address, timeout_s=30) as client:
            info = await client.info()
            result = await client.attend(x, weights=WeightsQuery(positions=(2,), average_heads=True, top_k=3))
            answers = {name: answer async for name, answer in client.attend_stream(requests())}
            return info, result, answers

    info, result, answers = asyncio.run(run())
    assert (info.d_model, info.num_heads) == (D_MODEL, HEADS)
    assert relative_l2(result.output, _reference(weights, x)) <= 1e-5
    assert result.weights is not None and result.weights.shape == (2, 1, 1, 3) and result.averaged
    assert set(answers) == {"a0", "a1", "a2"}
    for i in range(3):
        answer = answers[f"a{i}"]
        assert isinstance(answer, AttendResult)
        assert relative_l2(answer.output[1:, : 5 + i], _reference(weights, x[1:, : 5 + i])) <= 1e-5


def test_a_deadline_too_short_is_deadline_exceeded(client: AttentionClient) -> None:
    x = _states(8, 1024, seed=5)  # 16 MiB: cannot even be sent in 100 µs
    with pytest.raises(grpc.RpcError) as caught:
        client.attend(x, timeout_s=1e-4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.attend(_states(1, 4)).output.shape == (1, 4, D_MODEL), "the server still answers"


def test_client_side_checks() -> None:
    with AttentionClient("127.0.0.1:1") as unused, pytest.raises(TypeError, match="float32 or float16"):
        unused.attend(np.zeros((1, 2, D_MODEL)))  # refused before anything is sent
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        AttentionClient("127.0.0.1:1", tls_cert=Path("cert.pem"))


def test_cli_info_attend_weights(
    server: ServerProcess, weights: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", server.address, "--timeout", "30"]
    assert main([*target, "info"]) == 0
    out = capsys.readouterr().out
    assert "d_model 512, heads 8, head_dim 64" in out and "sha256 " in out and f"attnserve {__version__}" in out

    assert main([*target, "attend", "--batch", "2", "--seq-len", "9", "--lengths", "9,4", "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "[2, 9, 512] float16" in out and "sha256 " in out and "round trip" in out and "compute" in out

    argv = [*target, "weights", "--seq-len", "16", "--positions", "3,7", "--top-k", "4", "--average-heads"]
    assert main([*argv, "--seed", "6"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    probs = reference_attention(weights, HEADS, _states(1, 16, seed=6))[1].mean(axis=1)[0]  # [S, S]
    assert [(row[0], row[1]) for row in rows] == [("3", "avg"), ("7", "avg")]
    for row in rows:
        keys = [int(cell.rstrip(":")) for cell in row[2::2]]
        assert keys == list(np.argsort(-probs[int(row[0])])[:4]), row

    assert main([*target, "weights", "--seq-len", "8", "--positions", "1", "--head", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split()[:2] == ["1", "3"]


def test_cli_errors(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", server.address]
    assert main([*target, "attend", "--seq-len", "5000"]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: hidden_states: sequence length 5000")
    assert main([*target, "attend"]) == 2  # --seq-len missing
    assert main([*target, "attend", "--seq-len", "4", "--lengths", "x"]) == 2
    assert main([*target, "weights", "--seq-len", "8", "--positions", "1", "--head", "8"]) == 2
    assert "--head 8" in capsys.readouterr().err


def test_installed_script_reads_the_target_from_the_environment(server: ServerProcess) -> None:
    script = Path(sys.executable).with_name("attnserve-client")
    env = {**os.environ, "ATTNSERVE_TARGET": server.address}
    done = subprocess.run([script, "info"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "d_model 512, heads 8" in done.stdout
