"""The service's torch-free core in-process: settings, the model-directory reader, weights views, streams."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.api.streams import answer_each
from service.errors import ModelDirectoryError
from service.model_dir import load_model_directory
from service.settings import DEFAULT_MAX_MESSAGE_BYTES, Settings, parse_settings
from service.types import WeightsSpec
from service.weights_view import select_weights


def test_settings_defaults_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = parse_settings([])
    assert (defaults.grpc_port, defaults.metrics_port, defaults.host, defaults.provider) == (
        8001,
        8002,
        "0.0.0.0",
        "auto",
    )
    assert defaults.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES >= 8 * 2048 * 512 * 4 + 1024
    monkeypatch.setenv("ATTNSERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("ATTNSERVE_ALLOW_SPINNING", "true")
    from_env = parse_settings([])
    assert from_env.grpc_port == 9001 and from_env.allow_spinning is True
    assert parse_settings(["--grpc-port", "9100"]).grpc_port == 9100  # the flag wins over the environment


def test_every_setting_is_a_flag_with_help() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} needs a description: it is the flag's help"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--provider", "tpu"], "provider"),
        (["--grpc-port", "-1"], "grpc_port"),
        (["--tls-cert", "a.pem"], "tls_cert and tls_key go together"),
        (["--tls-client-ca", "ca.pem"], "tls_client_ca (mutual TLS) needs tls_cert"),
    ],
)
def test_bad_settings_name_the_field(argv: list[str], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_settings(argv)


def test_model_directory_routes_as_recorded(served_model: Path) -> None:
    model = load_model_directory(served_model)
    config = json.loads((served_model / "config.json").read_text())
    assert (model.d_model, model.num_heads, model.max_seq_len) == (config["d_model"], config["num_heads"], 2048)
    for provider in ("cpu", "cuda"):
        for key, masked in (("unmasked", False), ("masked", True)):
            table = config["routing"][provider][key]
            low = 1
            for entry in table:
                for seq in (low, entry["up_to"]):
                    assert model.route(provider, masked, seq).name == entry["graph"]
                low = entry["up_to"] + 1
            assert model.route(provider, masked, 10**6).name == table[-1]["graph"]  # longest range takes the rest
    assert "weights" in {g.name for g in model.graphs_for("cpu")}


def _copy(served_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(served_model, copy)
    return copy


def test_model_directory_refusals(served_model: Path, tmp_path: Path) -> None:
    copy = _copy(served_model, tmp_path)
    (copy / "mha.onnx").unlink()
    with pytest.raises(ModelDirectoryError, match=r"mha.onnx: listed in config.json but missing"):
        load_model_directory(copy)
    config = json.loads((served_model / "config.json").read_text())
    config["format"] = "something-else/9"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="format 'something-else/9'"):
        load_model_directory(copy)
    config["format"] = "attnserve-model/1"
    config["routing"]["cpu"]["masked"] = [{"up_to": 64, "graph": "no_such_graph"}]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match=r"routing\.cpu\.masked names graph 'no_such_graph'"):
        load_model_directory(copy, verify=False)


def test_select_weights_rows_averages_and_top_k() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((2, 3, 5, 5)).astype(np.float32)
    full = select_weights(probs, WeightsSpec())
    assert full.positions == (0, 1, 2, 3, 4) and np.array_equal(full.values, probs) and full.indices is None
    rows = select_weights(probs, WeightsSpec(positions=(4, 1)))
    assert np.array_equal(rows.values, probs[:, :, [4, 1], :])
    averaged = select_weights(probs, WeightsSpec(positions=(2,), average_heads=True))
    assert averaged.values.shape == (2, 1, 1, 5)
    np.testing.assert_allclose(averaged.values[:, 0, 0], probs[:, :, 2].mean(axis=1), rtol=1e-6)
    top = select_weights(probs, WeightsSpec(positions=(0,), top_k=2))
    expected_order = np.argsort(-probs[:, :, [0], :], axis=-1, kind="stable")[..., :2]
    assert np.array_equal(top.indices, expected_order) and top.indices.dtype == np.int32
    assert np.array_equal(top.values, np.take_along_axis(probs[:, :, [0], :], expected_order, axis=-1))
    ties = select_weights(np.full((1, 1, 1, 4), 0.25, np.float32), WeightsSpec(top_k=3))
    assert ties.indices.ravel().tolist() == [0, 1, 2]  # equal weights: the lower key position first


def test_streams_answer_every_request_in_completion_order() -> None:
    async def scenario() -> list[int]:
        async def requests():
            for delay in (0.05, 0.0, 0.02):
                yield delay

        async def answer(delay: float) -> int:
            await asyncio.sleep(delay)
            return int(delay * 100)

        return [item async for item in answer_each(requests(), answer, max_pending=8)]

    assert asyncio.run(scenario()) == [0, 2, 5]


def test_a_stream_whose_answers_are_not_taken_stops_reading_its_requests() -> None:
    """Backpressure: with max_pending answers computed and not yet sent, no further request is read."""

    async def scenario() -> list[int]:
        pulled = 0

        async def requests():
            nonlocal pulled
            while True:
                pulled += 1
                yield pulled

        async def answer(value: int) -> int:
            return value

        answers = answer_each(requests(), answer, max_pending=2)
        seen = [await anext(answers)]  # handed to the transport, not yet sent: its slot is still held
        await asyncio.sleep(0.05)
        held = pulled
        seen.append(await anext(answers))  # the first went out: one more request may be read
        await asyncio.sleep(0.05)
        await answers.aclose()
        return [held, pulled, *seen]

    assert asyncio.run(scenario()) == [2, 3, 1, 2]


def test_a_broken_request_stream_is_re_raised_after_the_answers_already_due() -> None:
    async def scenario() -> list[int]:
        async def requests():
            yield 1
            raise ConnectionError("client went away")

        async def answer(value: int) -> int:
            return value

        return [item async for item in answer_each(requests(), answer, max_pending=8)]

    with pytest.raises(ConnectionError):
        asyncio.run(scenario())
