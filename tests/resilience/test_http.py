"""The HTTP/REST port under hostile clients, while the victim calls over gRPC: slow headers and slow bodies
(slowloris), more connections than http_max_connections, and bodies over max_message_bytes (declared and chunked)."""

from __future__ import annotations

import http.client
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.resilience.harness import case, check_after, observe, running, watching

pytestmark = pytest.mark.resilience

MAX_CONNECTIONS = 32
SLOW_CONNECTIONS = 48  # half trickle headers, half trickle a body; 16 are past the connection bound
BODY_TIMEOUT_S = 2.0
HOLD_S = 8.0  # longer than body_timeout_s: every slow connection must have been answered or closed by then
MAX_BODY = 4 << 20
OVERSIZED = 10
INFER = "/v2/models/attention/infer"


def _status(data: bytes) -> str:
    return data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"HTTP/1.1 ") else "garbage"


def _slowloris(port: int) -> Counter[str]:
    """Connections that send a byte every 0.2 s, of headers or of a body; how each ended within HOLD_S."""
    codes: Counter[str] = Counter()
    held: list[socket.socket] = []
    for i in range(SLOW_CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        body = i % 2 == 1
        s.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode() if body else b"GET /v2/heal"
        )
        s.settimeout(0.005)
        held.append(s)
    deadline = time.monotonic() + HOLD_S
    while held and time.monotonic() < deadline:
        for s in list(held):
            try:
                data = s.recv(4096)
                codes[_status(data) if data else "closed"] += 1
            except TimeoutError:
                try:
                    s.send(b"x")
                    continue
                except OSError:
                    codes["closed"] += 1
            except OSError:
                codes["closed"] += 1
            held.remove(s)
            s.close()
        time.sleep(0.2)
    codes["still open"] += len(held)
    for s in held:
        s.close()
    return codes


def _oversized(port: int) -> Counter[str]:
    codes: Counter[str] = Counter()
    for i in range(OVERSIZED):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            if i % 2:  # chunked: no Content-Length to refuse by, refused while read
                chunks = (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 4))
                connection.request("POST", INFER, chunks, encode_chunked=True)
            else:  # a claimed gigabyte, never sent
                connection.putrequest("POST", INFER)
                connection.putheader("Content-Length", str(1 << 30))
                connection.endheaders()
            codes[str(connection.getresponse().status)] += 1
        except OSError as error:
            codes[type(error).__name__] += 1
        finally:
            connection.close()
    return codes


def test_http_port_abuse(served_model: Path) -> None:
    attack = (
        f"HTTP: {SLOW_CONNECTIONS} slow-header/slow-body connections held {HOLD_S:.0f} s (bound "
        f"{MAX_CONNECTIONS}, body_timeout_s {BODY_TIMEOUT_S:g}); {OVERSIZED} bodies over {MAX_BODY >> 20} MiB"
    )
    flags = ("--http-max-connections", str(MAX_CONNECTIONS), "--body-timeout-s", str(BODY_TIMEOUT_S))
    with (
        case("http_port_abuse", attack) as result,
        running(served_model, *flags, "--max-message-bytes", str(MAX_BODY)) as server,
    ):
        with watching(server, served_model, abort_above_mib=1024) as watch:
            slow = _slowloris(server.http_port)
            big = _oversized(server.http_port)
        result.codes.update({f"slow {k}": v for k, v in slow.items()})
        result.codes.update({f"oversized {k}": v for k, v in big.items()})
        observe(result, watch, 100)
        result.expect("every slow connection answered or closed in time", slow["still open"] == 0, str(slow))
        result.expect("slow bodies get 408", slow["408"] > 0, str(slow))
        result.expect(
            "connections past the bound get 503", slow["503"] >= SLOW_CONNECTIONS - MAX_CONNECTIONS, str(slow)
        )
        result.expect("every oversized body gets 413", big == Counter({"413": OVERSIZED}), str(big))
        after = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        after.request("GET", "/v2/health/ready")
        result.expect("HTTP answers after the attack", after.getresponse().status == 200)
        after.close()
        result.checks.append(check_after(server, served_model))
