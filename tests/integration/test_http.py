"""KServe v2 over HTTP/REST against the real server: plain HTTP requests for every route and every error class,
stock tritonclient.http 2.41 (JSON and binary tensors) and perf_analyzer -i http, answers against the float64
reference."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from tests.server_process import ServerProcess, start_server
from tests.triton_tools import (
    perf_analyzer_measurement,
    run_triton_client,
)

D_MODEL = 512
INFER = "/v2/models/attention/infer"
TOKEN = "s3cret-token"
BODY_TIMEOUT_S = 1.0
MAX_BODY = 1 << 20


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        chunked = not isinstance(body, bytes | None)  # an iterable body goes out chunked, with no Content-Length
        connection.request(method, path, body, headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def infer_json(x: np.ndarray, mask: np.ndarray | None = None, outputs: list[dict] | None = None) -> dict:
    inputs = [{"name": "hidden_states", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    if mask is not None:
        inputs.append({"name": "attention_mask", "shape": list(mask.shape), "datatype": "INT32", "data": mask.tolist()})
    return {"id": "r-1", "inputs": inputs, **({"outputs": outputs} if outputs is not None else {})}


def states(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.fixture(scope="module")
def reference_model(served_model: Path) -> tuple[dict, dict]:
    return read_model_dir(served_model)


@pytest.fixture(scope="module")
def strict(served_model: Path) -> Iterator[ServerProcess]:
    """A server with a token, one call slot, a 1 s body timeout and 1 MiB messages: every bound reachable."""
    process = start_server(
        served_model, "--warmup", "false", "--auth-token", TOKEN, "--max-concurrent-rpcs", "1",
        "--body-timeout-s", str(BODY_TIMEOUT_S), "--max-message-bytes", str(MAX_BODY), "--http-max-connections", "8",
    )  # fmt: skip
    yield process
    process.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- every route, plain HTTP -------------------------------------------------------------------------------------


def test_health_metadata_config_and_stats_routes(server: ServerProcess) -> None:
    port = server.http_port
    assert call(port, "GET", "/v2/health/live")[::2] == (200, b'{"live": true}')
    assert call(port, "GET", "/v2/health/ready")[::2] == (200, b'{"ready": true}')
    status, _, body = call(port, "GET", "/v2")
    assert status == 200 and {"binary_tensor_data", "statistics"} <= set(json.loads(body)["extensions"])
    for prefix in ("/v2/models/attention", "/v2/models/attention/versions/1"):
        status, headers, body = call(port, "GET", prefix)
        metadata = json.loads(body)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert metadata["versions"] == ["1"] and metadata["inputs"][0]["shape"] == [-1, -1, D_MODEL]
        assert json.loads(call(port, "GET", prefix + "/ready")[2])["ready"] is True
        config = json.loads(call(port, "GET", prefix + "/config")[2])  # Triton's: the ModelConfig itself
        assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [-1, D_MODEL]
        stats = json.loads(call(port, "GET", prefix + "/stats")[2])["model_stats"][0]
        assert stats["name"] == "attention" and isinstance(stats["inference_stats"]["success"]["count"], int)
    assert json.loads(call(port, "GET", "/v2/models/stats")[2])["model_stats"][0]["version"] == "1"


def test_json_infer_with_mask_and_weights_matches_the_reference(server: ServerProcess, reference_model: tuple) -> None:
    config, weights = reference_model
    x = states(2, 12, D_MODEL)
    mask = np.ones((2, 12), np.int32)
    mask[1, 7:] = 0
    request = infer_json(x, mask, [{"name": "output"}, {"name": "attention_weights"}])
    request["inputs"][0]["data"] = x.tolist()  # nested, row-major
    status, _, body = call(server.http_port, "POST", INFER, json.dumps(request).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["id"] == "r-1" and answer["model_name"] == "attention" and answer["model_version"] == "1"
    (output, probs_out) = answer["outputs"]
    expected, probs = reference_attention(weights, config["num_heads"], x, mask, config["causal"])
    assert output["name"] == "output" and output["shape"] == [2, 12, D_MODEL] and output["datatype"] == "FP32"
    assert relative_l2(np.array(output["data"]).reshape(output["shape"]), expected) <= 1e-5
    assert relative_l2(np.array(probs_out["data"]).reshape(probs_out["shape"]), probs) <= 1e-5


def test_binary_infer_in_fp16_answers_in_binary(server: ServerProcess, reference_model: tuple) -> None:
    config, weights = reference_model
    x = states(1, 9, D_MODEL).astype(np.float16)
    mask = np.array([[True] * 6 + [False] * 3])
    header = json.dumps({
        "inputs": [
            {"name": "hidden_states", "shape": [1, 9, D_MODEL], "datatype": "FP16",
             "parameters": {"binary_data_size": x.nbytes}},
            {"name": "attention_mask", "shape": [1, 9], "datatype": "BOOL", "parameters": {"binary_data_size": 9}},
        ],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    body = header + x.tobytes() + mask.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    status, got, answer = call(server.http_port, "POST", INFER, body, headers)
    assert status == 200, answer
    split = int(got["Inference-Header-Content-Length"])
    (output,) = json.loads(answer[:split])["outputs"]
    assert output["datatype"] == "FP16" and output["parameters"]["binary_data_size"] == x.nbytes
    values = np.frombuffer(answer[split:], np.float16).reshape(x.shape)
    expected, _ = reference_attention(weights, config["num_heads"], x.astype(np.float32), mask, config["causal"])
    assert relative_l2(values, expected) <= 2e-3  # FP16 answer of an FP32 computation


def test_access_log_and_metrics_label_http_requests(server: ServerProcess) -> None:
    before = server.metric("attnserve_requests_total", api="http", method="infer", code="INVALID_ARGUMENT")
    assert call(server.http_port, "POST", INFER, b"{not json")[0] == 400
    server.wait_for_metric("attnserve_requests_total", before + 1, api="http", method="infer", code="INVALID_ARGUMENT")


# --- every error class -------------------------------------------------------------------------------------------

BAD = [
    ("bad JSON", b"{not json", 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "send a JSON object"),
    ("wrong shape", infer_json(states(1, 4, 8)), 400, "d_model"),
    ("data count", {"inputs": [{"name": "hidden_states", "shape": [1, 4, D_MODEL], "datatype": "FP32",
                                "data": [0.5]}]}, 400, "needs 2048"),
    ("wrong datatype", {"inputs": [{"name": "hidden_states", "shape": [1, 1, D_MODEL], "datatype": "INT64",
                                    "data": [1] * D_MODEL}]}, 400, "datatype 'INT64'"),
    ("strings as FP32", {"inputs": [{"name": "hidden_states", "shape": [1, 1, 1], "datatype": "FP32",
                                     "data": ["a"]}]}, 400, "not FP32 values"),
    ("unknown input", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "unknown"),
    ("unknown output", {**infer_json(states(1, 2, D_MODEL)), "outputs": [{"name": "z"}]}, 400, "unknown"),
    ("binary size past the body", {"inputs": [{"name": "hidden_states", "shape": [1, 1, D_MODEL], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 2048}}]}, 400, "binary bytes left"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "says"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_requests_get_400_naming_the_field(server: ServerProcess, body: object, status: int, says: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, answer = call(server.http_port, "POST", INFER, raw)
    assert got == status and headers["Content-Type"].startswith("application/json"), answer
    assert says in json.loads(answer)["error"]


def test_unknown_model_version_and_route_are_404_and_wrong_method_405(server: ServerProcess) -> None:
    port = server.http_port
    body = json.dumps(infer_json(states(1, 2, D_MODEL))).encode()
    assert call(port, "POST", "/v2/models/nope/infer", body)[0] == 404
    assert call(port, "POST", "/v2/models/attention/versions/7/infer", body)[0] == 404
    assert call(port, "GET", "/v2/models/nope/config")[0] == 404
    assert call(port, "GET", "/nothing/here")[0] == 404
    status, headers, _ = call(port, "GET", INFER)
    assert status == 405 and headers["Allow"] == "POST"


def test_timeout_parameter_of_one_microsecond_is_504(server: ServerProcess) -> None:
    request = {**infer_json(states(1, 64, D_MODEL)), "parameters": {"timeout": 1}}
    status, _, body = call(server.http_port, "POST", INFER, json.dumps(request).encode())
    assert status == 504, body


def test_token_is_required_except_for_health(strict: ServerProcess) -> None:
    port = strict.http_port
    assert call(port, "GET", "/v2/health/live")[0] == 200 and call(port, "GET", "/v2/health/ready")[0] == 200
    status, headers, body = call(port, "GET", "/v2/models/attention")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and b"missing" in body
    assert call(port, "GET", "/v2", headers={"Authorization": "Bearer nope"})[0] == 401
    body = json.dumps(infer_json(states(1, 2, D_MODEL))).encode()
    assert call(port, "POST", INFER, body)[0] == 401
    assert call(port, "POST", INFER, body, AUTH)[0] == 200


def test_too_large_body_is_413_before_it_is_read(strict: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", strict.http_port), timeout=10) as s:
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {MAX_BODY + 1}"
        s.sendall(head.encode() + b"\r\n\r\n")  # and no body: the answer comes without it
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    # Chunked, with no Content-Length: refused while reading, once past the bound.
    chunks = (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 2))
    status, _, body = call(strict.http_port, "POST", INFER, chunks, AUTH)
    assert status == 413, body
    # The JSON part of a body is held to 1/16 of it: bigger tensors travel as binary data.
    big = json.dumps(infer_json(states(1, 32, D_MODEL))).encode()
    assert MAX_BODY // 16 < len(big) < MAX_BODY
    status, _, body = call(strict.http_port, "POST", INFER, big, AUTH)
    assert status == 413 and b"binary" in body


def test_slow_body_holds_the_only_slot_for_body_timeout_then_408(strict: ServerProcess) -> None:
    port = strict.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{_auth_line()}Content-Length: 100\r\n\r\n{{".encode())
        started = time.monotonic()
        # It holds the server's one call slot: other calls get 429 with Retry-After, health still answers.
        while (busy := call(port, "GET", "/v2", headers=AUTH))[0] == 200:
            assert time.monotonic() - started < BODY_TIMEOUT_S, "the slow call never took the slot"
        status, headers, body = busy
        assert status == 429 and headers["Retry-After"] == "1" and b"max_concurrent_rpcs" in body
        assert call(port, "GET", "/v2/health/ready")[0] == 200
        answer = s.recv(65536)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert BODY_TIMEOUT_S * 0.5 <= waited <= BODY_TIMEOUT_S + 5, waited
    assert call(port, "GET", "/v2", headers=AUTH)[0] == 200  # the slot is back


def test_connections_past_the_bound_get_503(strict: ServerProcess) -> None:
    held = [socket.create_connection(("127.0.0.1", strict.http_port), timeout=10) for _ in range(8)]
    try:
        with socket.create_connection(("127.0.0.1", strict.http_port), timeout=10) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    finally:
        for s in held:
            s.close()


def _auth_line() -> str:
    return f"Authorization: Bearer {TOKEN}\r\n"


# --- stock clients -----------------------------------------------------------------------------------------------

TRITON_HTTP_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, in_path, out_path = sys.argv[1:4]
client = httpclient.InferenceServerClient(url=url)
facts = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("attention"),
    "metadata": client.get_model_metadata("attention"),
    "config": client.get_model_config("attention"),
    "server": client.get_server_metadata(),
}
data = np.load(in_path)
x, mask = data["x"], data["mask"]
answers = {}
for binary in (True, False):
    inputs = [httpclient.InferInput("hidden_states", list(x.shape), "FP32"),
              httpclient.InferInput("attention_mask", list(mask.shape), "INT32")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(mask, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("output", binary_data=binary),
               httpclient.InferRequestedOutput("attention_weights", binary_data=binary)]
    result = client.infer("attention", inputs, outputs=outputs, request_id="req-42")
    facts[f"id_{binary}"] = result.get_response()["id"]
    answers[f"output_{binary}"] = result.as_numpy("output")
    answers[f"weights_{binary}"] = result.as_numpy("attention_weights")
plain = client.infer("attention", inputs[:1])  # no mask, default outputs (binary, as tritonclient asks)
answers["plain"] = plain.as_numpy("output")
try:
    client.infer("nonexistent", inputs[:1])
except InferenceServerException as e:
    facts["unknown_model"] = [e.status(), e.message()]
facts["stats"] = client.get_inference_statistics("attention")
np.savez(out_path, **answers)
print(json.dumps(facts))
"""


def test_tritonclient_http_unchanged(server: ServerProcess, reference_model: tuple, tmp_path: Path) -> None:
    config, weights = reference_model
    x = states(2, 24, config["d_model"], seed=7)
    mask = np.ones((2, 24), np.int32)
    mask[1, 17:] = 0
    np.savez(tmp_path / "in.npz", x=x, mask=mask)
    done = run_triton_client(
        TRITON_HTTP_SCRIPT, server.http_address, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["live"] and facts["ready"] and facts["model_ready"]
    assert facts["metadata"]["name"] == "attention" and facts["metadata"]["inputs"][0]["shape"] == [-1, -1, 512]
    assert facts["config"]["max_batch_size"] == 8
    assert "binary_tensor_data" in facts["server"]["extensions"]
    assert facts["id_True"] == facts["id_False"] == "req-42"
    assert facts["unknown_model"][0] == "400" or "'nonexistent' not found" in facts["unknown_model"][1]
    assert facts["stats"]["model_stats"][0]["inference_stats"]["success"]["count"] >= 3

    got = np.load(tmp_path / "out.npz")
    expected, probs = reference_attention(weights, config["num_heads"], x, mask, config["causal"])
    for binary in (True, False):
        assert relative_l2(got[f"output_{binary}"], expected) <= 1e-5
        assert relative_l2(got[f"weights_{binary}"], probs) <= 1e-5
    expected_plain, _ = reference_attention(weights, config["num_heads"], x, None, config["causal"])
    assert relative_l2(got["plain"], expected_plain) <= 1e-5


def test_perf_analyzer_over_http_completes_a_measurement(server: ServerProcess, tmp_path: Path) -> None:
    rows = perf_analyzer_measurement("http", server.http_address, tmp_path)
    assert len(rows) == 1 and rows[0]["Concurrency"] == "2"
    assert float(rows[0]["Inferences/Second"]) > 0
    assert float(rows[0]["Server Compute Infer"]) > 0  # our statistics fed its server-side columns
