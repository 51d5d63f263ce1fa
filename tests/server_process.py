"""Start the real service (`python -m service`) in a subprocess on loopback and find its ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A loopback port free at this moment (for a server that must be told its port before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


READY = re.compile(r"attnserve ready: grpc [^:]+:(\d+) \((\w+)\), metrics (?::(\d+)|off)")
# The HTTP port, in ready lines since the REST edge (absent from older ones: http_port stays 0).
READY_HTTP = re.compile(r", http (?::(\d+)|off)")
ACCESS_LINES_KEPT = 100_000


def log_message(line: str) -> str:
    """A stderr line's message: the `message` field of a JSON line (--log-format json), else the line itself."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            return str(json.loads(line).get("message", line))
    return line


@dataclass
class ServerProcess:
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_lines: list[str] = field(default_factory=list)
    access_lines: deque[str] = field(default_factory=lambda: deque(maxlen=ACCESS_LINES_KEPT))  # stdout: JSON
    http_port: int = 0  # 0: HTTP off

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        """host:port of the REST port, as tritonclient.http and perf_analyzer -i http take it."""
        assert self.http_port, f"this server has no HTTP port; its log ends:\n{self.log_tail()}"
        return f"127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return "".join(self.log_lines)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log (stderr), for a failure message."""
        return "".join(self.log_lines[-lines:])

    def state(self) -> str:
        """'running', or how the process ended, for a failure message."""
        code = self.process.poll()
        return "running" if code is None else f"exited with {code}"

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.process.wait(timeout_s)

    def stop(self) -> int:
        return stop_process(self.process, grace_s=60.0)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the /metrics samples called `name` (as exposed: `..._total`, `..._count`) whose labels
        include `labels`; 0 when there are none."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def wait_for_metric(self, name: str, at_least: float, timeout_s: float = 30.0, **labels: str) -> float:
        """Poll `metric(name, **labels)` until it is at least `at_least`; that value. A test that needs the
        server in some state (a request running, one dropped) waits for the server to report it: a fixed
        sleep is a guess that a loaded machine can prove wrong. On timeout, an AssertionError with every value
        seen (and when) and the server's log tail."""
        started = time.monotonic()
        seen: list[tuple[float, float]] = []
        while (value := self.metric(name, **labels)) < at_least:
            elapsed = time.monotonic() - started
            if not seen or seen[-1][1] != value:
                seen.append((elapsed, value))
            if elapsed > timeout_s:
                history = ", ".join(f"{value:g} at {at:.2f} s" for at, value in seen)
                raise AssertionError(
                    f"{name}{labels or ''} did not reach {at_least:g} in {timeout_s:g} s (seen: {history}); "
                    f"server {self.state()}; its log ends:\n{self.log_tail()}"
                )
            time.sleep(0.01)
        return value


def stop_process(process: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM (a server drains, Prometheus flushes), SIGKILL if it is still there after grace_s; the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def server_command(model_dir: Path, *args: str, http: bool = True) -> list[str]:
    """http=False: no --http-port flag, for a checkout older than the HTTP port (a benchmark's "before" row)."""
    return [
        sys.executable, "-m", "service", "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", *(("--http-port", "0") if http else ()),
        *args,
    ]  # fmt: skip


def run_service(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """`python -m service *args` to its end (--help, a start-up that must fail), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def start_server(
    model_dir: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120.0,
    stdout: Path | None = None, cwd: Path | None = None, http: bool = True,
) -> ServerProcess:  # fmt: skip
    """Launch, wait for the ready line (after warm-up), return the ports; raise with the log if it dies.

    The access log (stdout) is kept in `access_lines`, read by a thread of this process; with `stdout` it goes
    to that file instead, and nothing here reads it (benchmarks: no reader thread taking this process's GIL).
    cwd: another checkout of this repository to run the server from (a benchmark's "before" row; with http=False
    when it predates the HTTP port)."""
    with open(stdout, "wb") if stdout is not None else contextlib.nullcontext() as sink:
        process = subprocess.Popen(
            server_command(model_dir, *args, http=http),
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE if sink is None else sink,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd or Path(__file__).resolve().parents[1],
        )
    lines: list[str] = []
    found: list[re.Match[str]] = []
    ready = threading.Event()

    def pump() -> None:  # keeps reading after ready, so the pipe never fills and blocks the server
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if not found and (match := READY.search(log_message(line))):
                found.append(match)
                ready.set()
        ready.set()

    access: deque[str] = deque(maxlen=ACCESS_LINES_KEPT)

    def pump_access() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            access.append(line)

    threading.Thread(target=pump, daemon=True).start()
    if stdout is None:
        threading.Thread(target=pump_access, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("server not ready in time:\n" + "".join(lines))
    if not found:
        process.wait(10)
        raise RuntimeError(f"server exited with {process.returncode} before ready:\n" + "".join(lines))
    http = READY_HTTP.search(found[0].string)
    http_port = int(http.group(1) or 0) if http is not None else 0
    return ServerProcess(process, int(found[0].group(1)), int(found[0].group(3) or 0), lines, access, http_port)
