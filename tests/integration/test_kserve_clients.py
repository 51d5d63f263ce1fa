"""Stock KServe v2 / Triton tools against the real server, unchanged: tritonclient 2.41 and perf_analyzer.

tritonclient registers the same `inference.*` protobuf names as service._pb, so it runs in a child interpreter.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from tests.server_process import ServerProcess
from tests.triton_tools import (
    perf_analyzer_measurement,
    run_triton_client,
)

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, in_path, out_path = sys.argv[1:4]
client = grpcclient.InferenceServerClient(url=url)
facts = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("attention"),
    "metadata": client.get_model_metadata("attention", as_json=True),
    "config": client.get_model_config("attention", as_json=True)["config"],
    "server": client.get_server_metadata(as_json=True),
}
data = np.load(in_path)
x, mask = data["x"], data["mask"]
inputs = [grpcclient.InferInput("hidden_states", list(x.shape), "FP32"),
          grpcclient.InferInput("attention_mask", list(mask.shape), "INT32")]
inputs[0].set_data_from_numpy(x)
inputs[1].set_data_from_numpy(mask)
outputs = [grpcclient.InferRequestedOutput("output"), grpcclient.InferRequestedOutput("attention_weights")]
result = client.infer("attention", inputs, outputs=outputs, request_id="req-42")
facts["id"] = result.get_response().id
plain = client.infer("attention", inputs[:1])  # no mask, default outputs
facts["plain_outputs"] = [o.name for o in plain.get_response().outputs]
try:
    client.infer("nonexistent", inputs[:1])
except InferenceServerException as e:
    facts["unknown_model"] = [e.status(), e.message()]
facts["stats"] = client.get_inference_statistics("attention", as_json=True)
np.savez(out_path, output=result.as_numpy("output"), weights=result.as_numpy("attention_weights"),
         plain=plain.as_numpy("output"))
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def reference_model(served_model: Path) -> tuple[dict, dict]:
    return read_model_dir(served_model)


def test_tritonclient_unchanged(server: ServerProcess, reference_model: tuple, tmp_path: Path) -> None:
    config, weights = reference_model
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 24, config["d_model"]), dtype=np.float32)
    mask = np.ones((2, 24), np.int32)
    mask[1, 17:] = 0
    np.savez(tmp_path / "in.npz", x=x, mask=mask)
    done = run_triton_client(TRITON_SCRIPT, server.address, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
    facts = json.loads(done.stdout.strip().splitlines()[-1])

    assert facts["live"] and facts["ready"] and facts["model_ready"]
    assert facts["metadata"]["name"] == "attention" and facts["metadata"]["versions"] == ["1"]
    inputs = {t["name"]: t for t in facts["metadata"]["inputs"]}
    assert inputs["hidden_states"]["datatype"] == "FP32"
    assert inputs["hidden_states"]["shape"] == ["-1", "-1", str(config["d_model"])]  # int64 fields are JSON strings
    model_config = facts["config"]
    assert model_config["max_batch_size"] == 8
    assert model_config["input"][0]["dims"] == ["-1", str(config["d_model"])]
    # The server batches (default settings): the config says so, with its queue bound, as Triton's would.
    assert model_config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
    assert "tokens per run" in model_config["parameters"]["dynamic_batching"]["string_value"]
    assert "statistics" in facts["server"]["extensions"]
    assert facts["id"] == "req-42"
    assert facts["plain_outputs"] == ["output"]
    code, message = facts["unknown_model"]
    assert code == "StatusCode.NOT_FOUND" and "'nonexistent' not found" in message
    stats = facts["stats"]["model_stats"][0]
    assert stats["version"] == "1" and int(stats["inference_stats"]["success"]["count"]) >= 2

    got = np.load(tmp_path / "out.npz")
    expected, probs = reference_attention(weights, config["num_heads"], x, mask, config["causal"])
    assert relative_l2(got["output"], expected) <= 1e-5
    assert got["weights"].shape == (2, config["num_heads"], 24, 24)
    assert relative_l2(got["weights"], probs) <= 1e-5
    expected_plain, _ = reference_attention(weights, config["num_heads"], x, None, config["causal"])
    assert relative_l2(got["plain"], expected_plain) <= 1e-5


def test_perf_analyzer_completes_a_measurement(server: ServerProcess, tmp_path: Path) -> None:
    rows = perf_analyzer_measurement("grpc", server.address, tmp_path)
    assert len(rows) == 1 and rows[0]["Concurrency"] == "2"
    assert float(rows[0]["Inferences/Second"]) > 0
    assert float(rows[0]["Server Compute Infer"]) > 0  # our ModelStatistics fed its server-side columns


def test_perf_analyzer_sweep_writes_csv_and_summary(server: ServerProcess, tmp_path: Path) -> None:
    from tests.load.perf_analyzer_sweep import sweep, write_summary

    summary = sweep(server.address, [16], [1, 2], window_ms=500, out=tmp_path)
    rows = list(csv.DictReader((tmp_path / "attention_seq16.csv").open()))
    assert [row["Concurrency"] for row in rows] == ["1", "2"]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
    write_summary(summary, tmp_path / "summary.md", "test")
    assert "| 16 | 2 |" in (tmp_path / "summary.md").read_text()
