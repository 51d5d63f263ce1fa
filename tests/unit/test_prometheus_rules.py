"""deploy/prometheus/: promtool on the config, the rules and their unit tests; the rules against the service's
metric names; and a real Prometheus scraping a target and loading the rules (tests/prometheus_process.py).

promtool and prometheus come from Debian's prometheus, which `make system-deps` (part of make test) installs:
without them these tests fail, they do not skip.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from service.observe.metrics import SERVICE_METRICS
from tests.prometheus_process import (
    DEFAULT_RULES,
    PROMETHEUS_DIR,
    PROMETHEUS_YML,
    PrometheusProcess,
    require_binary,
    start_prometheus,
)

RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"

# No YAML library in the venv: the names are read by pattern, and cross-checked against promtool's count
# (rules) and the number of `alertname:` keys (tests), so a layout the patterns miss fails instead of passing.
RULE = re.compile(r"^\s*- (record|alert):\s*(\S+)\s*$", re.MULTILINE)
ALERT_CASE = re.compile(r"^\s*alertname:\s*(\S+)\s*\n\s*exp_alerts:(.*)$", re.MULTILINE)
METRIC = re.compile(r"attnserve_[a-z_]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        binary = require_binary("promtool")
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    return subprocess.run([binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} -> {result.returncode}\n{result.stdout}{result.stderr}"


def alert_names() -> list[str]:
    return [name for kind, name in RULE.findall(DEFAULT_RULES.read_text()) if kind == "alert"]


def test_config_is_valid() -> None:
    assert_ok(promtool("check", "config", str(PROMETHEUS_YML)))


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(DEFAULT_RULES))
    assert_ok(result)
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found, result.stdout
    assert int(found.group(1)) == len(RULE.findall(DEFAULT_RULES.read_text())), "RULE misses rules; see its comment"


def test_rules_unit_tests_pass() -> None:
    assert_ok(promtool("test", "rules", str(RULES_TEST)))


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    text = RULES_TEST.read_text()
    cases = ALERT_CASE.findall(text)
    keys = re.findall(r"^\s*alertname:", text, re.MULTILINE)
    assert len(cases) == len(keys), "keep `exp_alerts:` on the line after `alertname:`"
    firing = {name for name, rest in cases if rest.strip() != "[]"}
    quiet = {name for name, rest in cases if rest.strip() == "[]"}
    alerts = set(alert_names())
    assert alerts, f"no alerts found in {DEFAULT_RULES}"
    # promtool passes a test of an alert that does not exist (it never fires): catch the typo here.
    assert (firing | quiet) <= alerts, f"tests of unknown alerts: {sorted((firing | quiet) - alerts)}"
    assert not alerts - firing, f"alerts never seen firing in {RULES_TEST.name}: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts without an `exp_alerts: []` case: {sorted(alerts - quiet)}"


def test_rules_use_only_service_metrics() -> None:
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in METRIC.findall(DEFAULT_RULES.read_text())}
    assert used, f"no attnserve_ metric in {DEFAULT_RULES}"
    assert not used - set(SERVICE_METRICS), f"not exposed by the service: {sorted(used - set(SERVICE_METRICS))}"


def wait_for_rule_evaluation(prometheus: PrometheusProcess, timeout_s: float) -> list[dict]:
    """Every loaded rule, once each has been evaluated at least once (health leaves "unknown")."""
    deadline = time.monotonic() + timeout_s
    while True:
        rules = [rule for group in prometheus.rules() for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            return rules
        assert time.monotonic() < deadline, f"rules not evaluated in {timeout_s} s: {rules}"
        time.sleep(0.2)


def test_real_prometheus_scrapes_a_target_and_loads_the_rules(tmp_path: Path) -> None:
    registry = CollectorRegistry()  # its own: nothing global leaks between tests
    counter = Counter("harness_smoke", "incremented once by the test", registry=registry)
    counter.inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        try:
            prometheus = start_prometheus([f"127.0.0.1:{server.server_port}"], tmp_path)
        except FileNotFoundError as e:
            pytest.fail(str(e), pytrace=False)
        with prometheus:
            result = prometheus.wait_for("harness_smoke_total", 20)
            assert result[0]["value"][1] == "1", result
            assert result[0]["metric"]["job"] == "attnserve", result
            assert prometheus.targets_up(), prometheus.targets()
            rules = wait_for_rule_evaluation(prometheus, 20)
            assert sorted(r["name"] for r in rules if r["type"] == "alerting") == sorted(alert_names())
            broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            assert not broken, broken
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
