"""A real Prometheus (Debian's `prometheus`, which `make system-deps` installs) for tests, on loopback.

`start_prometheus` runs it with a config derived from deploy/prometheus/prometheus.yml (1 s intervals, the
given targets, the real rules), so a test scrapes and evaluates exactly what a deployment would.

The venv has no YAML library, so the config is derived line by line: each line it rewrites must occur
exactly once in the deploy file, and a deploy file of another shape stops the tests with a message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.server_process import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
DEFAULT_RULES = PROMETHEUS_DIR / "rules.yml"
INSTALL_HINT = "`make system-deps` installs it (Debian package prometheus); CI runs make test, which does"
READY_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0


def require_binary(name: str) -> str:
    """The binary's path; FileNotFoundError saying how to install it (tests fail on it, never skip)."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed: {INSTALL_HINT}")
    return path


def derive_config(targets: list[str], scrape_interval: str = "1s", rules: Path | None = DEFAULT_RULES) -> str:
    """deploy/prometheus/prometheus.yml with both intervals set, the attnserve job's targets replaced and
    rule_files made absolute (or emptied when rules is None)."""
    rule_files = f"[{json.dumps(str(Path(rules).resolve()))}]" if rules is not None else "[]"
    text = PROMETHEUS_YML.read_text()
    rewrites = [  # (a line, its key as group 1; the new value)
        (r"^(\s*scrape_interval:).*$", scrape_interval),
        (r"^(\s*evaluation_interval:).*$", scrape_interval),
        (r"^(\s*- targets:).*$", json.dumps(targets)),
        # The one rule file, relative to the deploy config; the derived config lives in workdir.
        (r"^(rule_files:)\n\s*- rules\.yml.*$", rule_files),
    ]
    for pattern, value in rewrites:
        text, count = re.subn(pattern, lambda m, v=value: f"{m.group(1)} {v}", text, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"{PROMETHEUS_YML}: {pattern!r} matched {count} times, not once; update derive_config")
    return text


class PrometheusError(RuntimeError):
    """Prometheus answered with status error (a bad query), or did not start."""


class PrometheusProcess:
    """A running prometheus; its output goes to workdir/prometheus.log, never to a pipe that could fill."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _get(self, path: str, **params: str) -> Any:
        """GET /api/v1/...; the `data` of a success, PrometheusError with Prometheus's message otherwise."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:  # 400/422/503 carry the JSON error body
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {e.code}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: [{"metric": {...}, "value": [ts, "value"]}, ...]; a scalar comes as one such entry."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def wait_for(self, expr: str, timeout_s: float) -> list[dict[str, Any]]:
        """Poll `expr` until it returns something; TimeoutError with the targets' state and the log if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{expr!r} still empty after {timeout_s} s; targets: {self.targets()}\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def exemplars(self, expr: str, since_s: float = 600.0) -> list[dict[str, Any]]:
        """Exemplars of the series `expr` selects over the last since_s: [{"seriesLabels", "exemplars"}]."""
        now = time.time()
        return list(self._get("/api/v1/query_exemplars", query=expr, start=str(now - since_s), end=str(now)))

    def targets(self) -> list[dict[str, Any]]:
        """The active targets: scrapeUrl, health (up/down/unknown), lastError, labels, ..."""
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    def targets_up(self) -> bool:
        """True when there is at least one target and every one was scraped successfully."""
        targets = self.targets()
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups (/api/v1/rules): each rule's name, query, health and lastError."""
        return list(self._get("/api/v1/rules")["groups"])

    def stop(self) -> int:
        """Terminate (Prometheus flushes and exits on SIGTERM), kill if it hangs; the exit code."""
        return stop_process(self.process, grace_s=10.0)

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_prometheus(
    targets: list[str], workdir: Path, scrape_interval: str = "1s", rules: Path | None = DEFAULT_RULES
) -> PrometheusProcess:
    """Write workdir/prometheus.yml, start prometheus on a free loopback port, wait for /-/ready."""
    binary = require_binary("prometheus")
    if rules is not None and not Path(rules).is_file():  # rule_files are globs: a missing file loads nothing
        raise FileNotFoundError(f"no rule file {rules}")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(derive_config(targets, scrape_interval, rules))
    log_path = workdir / "prometheus.log"
    port = free_port()  # another process may take it before prometheus binds: then the start fails loudly
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [
                binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--enable-feature=exemplar-storage",  # the service's request ids, kept with the histograms
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )  # fmt: skip
    prometheus = PrometheusProcess(process, port, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {process.returncode}:\n{prometheus.log_tail()}")
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=1.0) as response:
                if response.status == 200:
                    return prometheus
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while the TSDB opens
        if time.monotonic() > deadline:
            prometheus.stop()
            raise PrometheusError(f"prometheus not ready in {READY_TIMEOUT_S} s:\n{prometheus.log_tail()}")
        time.sleep(0.1)
