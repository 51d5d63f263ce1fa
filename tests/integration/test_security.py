"""Transport security: TLS, mutual TLS and the bearer token, with certificates made at run time."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve_client import AttentionClient, StreamRequest
from attnserve_client.cli import main
from tests.server_process import ServerProcess, start_server

D_MODEL = 512
TOKEN = "client-test-token"
SERVER_NAME = "attnserve.test"


def _states(batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, seq, D_MODEL), dtype=np.float32)


def _write_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for SERVER_NAME and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attnserve test CA")])

    def issue(name: str, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    paths = {}
    for role, name in (("ca", ""), ("server", SERVER_NAME), ("client", "client.attnserve.test")):
        key = ca_key if role == "ca" else ec.generate_private_key(ec.SECP256R1())
        cert = issue(name, key, ca=role == "ca")
        paths[f"{role}_cert"] = folder / f"{role}.crt"
        paths[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"] = folder / f"{role}.key"
        paths[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


@pytest.fixture(scope="module")
def secure_process(
    served_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, dict]]:
    """Mutual TLS and a bearer token, health also on a plaintext port for probes; no warm-up (faster)."""
    certs = _write_certificates(tmp_path_factory.mktemp("tls"))
    args = (
        "--tls-cert", str(certs["server_cert"]), "--tls-key", str(certs["server_key"]),
        "--tls-client-ca", str(certs["ca_cert"]), "--auth-token", TOKEN, "--warmup", "false", "--health-port", "0",
    )  # fmt: skip
    process = start_server(served_model, *args)
    try:
        yield process, certs
    finally:
        process.stop()


@pytest.fixture(scope="module")
def secure_server(secure_process: tuple[ServerProcess, dict]) -> tuple[str, dict]:
    process, certs = secure_process
    return process.address, certs


def test_mutual_tls_and_token(secure_server: tuple[str, dict], capsys: pytest.CaptureFixture[str]) -> None:
    address, certs = secure_server
    tls = {
        "tls_ca": certs["ca_cert"],
        "tls_cert": certs["client_cert"],
        "tls_key": certs["client_key"],
        "tls_server_name": SERVER_NAME,
    }
    with AttentionClient(address, token=TOKEN, timeout_s=30, **tls) as client:
        assert client.info().d_model == D_MODEL
        assert client.attend(_states(1, 5)).output.shape == (1, 5, D_MODEL)
    with AttentionClient(address, timeout_s=30, **tls) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(client.attend_stream([StreamRequest(_states(1, 3))]))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    token_file = certs["ca_cert"].with_name("token")
    token_file.write_text(TOKEN + "\n")
    flags = ["--tls-ca", str(certs["ca_cert"]), "--tls-cert", str(certs["client_cert"])]
    flags += ["--tls-key", str(certs["client_key"]), "--tls-server-name", SERVER_NAME, "--timeout", "30"]
    assert main(["--target", address, *flags, "--token-file", str(token_file), "info"]) == 0
    assert "d_model 512" in capsys.readouterr().out
    assert main(["--target", address, *flags, "--token", "wrong", "info"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED: ")


def _secure_channel(address: str, certs: dict, with_client_cert: bool = True, ca: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or certs["ca_cert"]).read_bytes(),
        private_key=certs["client_key"].read_bytes() if with_client_cert else None,
        certificate_chain=certs["client_cert"].read_bytes() if with_client_cert else None,
    )
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def _health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_client_without_the_right_certificate_is_refused(secure_server: tuple[str, dict], tmp_path: Path) -> None:
    address, certs = secure_server
    with grpc.insecure_channel(address) as plaintext, pytest.raises(grpc.RpcError) as caught:
        _health_status(plaintext)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with _secure_channel(address, certs, with_client_cert=False) as no_cert, pytest.raises(grpc.RpcError) as caught:
        _health_status(no_cert)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: mutual TLS wants a cert
    stranger = _write_certificates(tmp_path)  # a client certificate from a CA the server does not trust
    with _secure_channel(address, stranger, ca=certs["ca_cert"]) as untrusted, pytest.raises(grpc.RpcError) as caught:
        _health_status(untrusted)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token_so_probes_reach_it(secure_server: tuple[str, dict]) -> None:
    address, certs = secure_server
    with _secure_channel(address, certs) as channel:
        assert _health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_wrong_token_is_unauthenticated_and_says_what_to_send(secure_server: tuple[str, dict]) -> None:
    address, certs = secure_server
    tls = {"tls_ca": certs["ca_cert"], "tls_cert": certs["client_cert"], "tls_key": certs["client_key"]}
    client = AttentionClient(address, token="not-the-token", tls_server_name=SERVER_NAME, timeout_s=30, **tls)
    with client, pytest.raises(grpc.RpcError) as caught:
        client.attend(_states(1, 4))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization metadata wrong; send `authorization: Bearer <token>`" in caught.value.details()


def test_token_from_a_file_on_a_plaintext_server(served_model: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    process = start_server(served_model, "--auth-token-file", str(token_file), "--warmup", "false")
    try:
        with AttentionClient(process.address, token="from-a-file", timeout_s=30) as client:
            assert client.info().d_model == D_MODEL
        with AttentionClient(process.address, timeout_s=30) as client, pytest.raises(grpc.RpcError) as caught:
            client.info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization metadata missing" in caught.value.details()
    finally:
        process.stop()


def test_probes_reach_health_over_plaintext_on_the_health_port_and_nothing_else(
    secure_process: tuple[ServerProcess, dict],
) -> None:
    process, _ = secure_process
    match = re.search(r"health :(\d+) \(plaintext\)", process.log())
    assert match, process.log()
    with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
        assert _health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        attend = channel.unary_unary("/attnserve.v1.AttentionService/GetModelInfo")
        with pytest.raises(grpc.RpcError) as caught:
            attend(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # only health lives on that port


# Fail closed: a configured token that is empty or unreadable, or a TLS file that cannot be read, must stop the
# server at start (exit 2, one line), never start it with auth or TLS silently off.
EMPTY_TOKEN = "is set but empty or only whitespace; give the bearer token"
EMPTY_FILE = "the file is empty or only whitespace; it must hold the bearer token"


@pytest.mark.parametrize(
    ("file_text", "env_token", "expected"),
    [
        ("", None, "auth_token_file {file}: " + EMPTY_FILE),
        ("\n", None, "auth_token_file {file}: " + EMPTY_FILE),
        (" \t \n", None, "auth_token_file {file}: " + EMPTY_FILE),
        (None, "", "auth_token (--auth-token or ATTNSERVE_AUTH_TOKEN) " + EMPTY_TOKEN),
        (None, " \t ", "auth_token (--auth-token or ATTNSERVE_AUTH_TOKEN) " + EMPTY_TOKEN),
        ("missing", None, "auth_token_file {file}: cannot read it (No such file or directory)"),
        ("directory", None, "auth_token_file {file}: cannot read it (Is a directory)"),
    ],
    ids=["empty-file", "newline-file", "whitespace-file", "empty-env", "whitespace-env", "missing-file", "directory"],
)
def test_a_configured_but_unusable_token_stops_the_server(
    served_model: Path, tmp_path: Path, file_text: str | None, env_token: str | None, expected: str
) -> None:
    token_file = tmp_path / "token"
    args: list[str] = []
    if file_text == "directory":
        token_file.mkdir()
    elif file_text is not None and file_text != "missing":
        token_file.write_text(file_text)
    if file_text is not None:
        args = ["--auth-token-file", str(token_file)]
    env = {} if env_token is None else {"ATTNSERVE_AUTH_TOKEN": env_token}
    done = _run_server_cli(served_model, *args, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"attnserve: bad settings: {expected.format(file=token_file)}"), line


def test_an_unreadable_tls_file_stops_the_server(served_model: Path, tmp_path: Path) -> None:
    certs = _write_certificates(tmp_path)
    for role, flags in (
        ("tls_cert", ["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(certs["server_key"])]),
        ("tls_key", ["--tls-cert", str(certs["server_cert"]), "--tls-key", str(tmp_path)]),
    ):
        done = _run_server_cli(served_model, *flags)
        assert done.returncode == 2, done.stderr[-2000:]
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"attnserve: bad settings: {role} ") and ": cannot read it (" in line, line
    ca = ["--tls-cert", str(certs["server_cert"]), "--tls-key", str(certs["server_key"])]
    done = _run_server_cli(served_model, *ca, "--tls-client-ca", str(tmp_path / "nope-ca.crt"))
    assert done.returncode == 2 and "tls_client_ca " in done.stderr and "Traceback" not in done.stderr


def _run_server_cli(model_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python -m service with a real model; a server that wrongly starts is stopped by the timeout (a failure)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--grpc-port", "0"]
    command += ["--metrics-port", "0", "--http-port", "0", "--warmup", "false", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
