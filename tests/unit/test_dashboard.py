"""The Grafana dashboard: generated, complete, laid out, and querying only metrics the service exposes.

Grafana does not run here; the end-to-end test runs these queries against a real Prometheus. This file
checks what can be checked without either: the JSON against its generator, the panels' shape, every
PromQL expression against the metrics contract, and (with promtool) that each one parses.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from service.observe.fast_metrics import FastCounter, FastHistogram
from service.observe.metrics import SERVICE_METRICS, Metrics
from tests.grafana_queries import (
    DASHBOARD,
    LAYOUT_PANEL_TYPES,
    PanelQuery,
    concrete,
    iter_panels,
    load,
    panel_queries,
    variable_queries,
)

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# The service's metrics (service/observe/metrics.py) with their labels, as the exposition names them: histograms
# add _bucket/_sum/_count. To be replaced by the service's own registry.
def _service_labels() -> dict[str, tuple[str, ...]]:
    """The service's own metrics (exposed names) and their label names, read from its metric objects."""
    labels = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, FastHistogram | FastCounter):
            labels[metric.name + ("_total" if isinstance(metric, FastCounter) else "")] = metric.labelnames
        elif isinstance(metric, MetricWrapperBase):
            labels[metric._name] = tuple(metric._labelnames)
    return labels


CONTRACT_LABELS = _service_labels()
CONTRACT_METRICS = SERVICE_METRICS
assert set(CONTRACT_LABELS) == set(SERVICE_METRICS)  # the documented names are the registry's
# Metrics from outside the service's own registry: Prometheus' `up`, prometheus_client's process collector.
OTHER_METRICS = ("up", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds")
TARGET_LABELS = ("job", "instance")  # added by Prometheus to every scraped series

# Row -> the panels it must hold (titles), in page order.
EXPECTED_ROWS = {
    "Latency": (
        "Request latency p50 / p90 / p99 by sequence length",
        "Latency against sequence length",
        "Request latency heatmap",
    ),
    "Where the time goes": (
        "Queue vs compute share of request time",
        "Queue and compute p99 by sequence length",
        "Engine runs by provider and graph",
    ),
    "Throughput & batching": (
        "Requests per second by API and code",
        "Tokens per second",
        "Batch size",
        "Padding ratio",
    ),
    "Saturation & errors": (
        "In-flight requests and queue depth",
        "Errors by code",
        "Dropped requests by reason",
        "Process memory (RSS)",
        "Process CPU",
    ),
    "Model": ("Model, provider and build", "Scrape target up"),
}

_SELECTOR = re.compile(r"(?<![\w:\"])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"(?<=[})])\[([^\]]+)\]")  # a range or subquery, not a regex's [...] in a string
_METRIC = re.compile(r"\b(?:attnserve_\w+|process_\w+)\b")


def _gen_dashboard() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_dashboard", ROOT / "scripts" / "gen_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _contract_name(name: str) -> str:
    """The metric a series name belongs to: a histogram's _bucket/_sum/_count series are the histogram."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def _query_panels() -> list[dict[str, Any]]:
    return [p for p in iter_panels(load()) if p["type"] not in LAYOUT_PANEL_TYPES]


def _all_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every variable's query."""
    out = [(f"{q.panel} / {q.ref_id}", q.expr) for q in panel_queries()]
    return out + [(f"variable {v.name}", v.expr) for v in variable_queries()]


# --- generated, deterministic --------------------------------------------------------------------------


def test_committed_dashboard_is_what_the_generator_writes() -> None:
    gen = _gen_dashboard()
    assert DASHBOARD.read_text(encoding="utf-8") == gen.render(), gen.HINT


def test_check_flag_reports_drift(tmp_path: Path) -> None:
    gen = _gen_dashboard()
    out = tmp_path / "attnserve.json"
    assert gen.main(["--check", "--out", str(out)]) == 1  # missing
    assert gen.main(["--out", str(out)]) == 0
    assert gen.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace('"10s"', '"5s"'), encoding="utf-8")
    assert gen.main(["--check", "--out", str(out)]) == 1


# --- the dashboard as a whole ----------------------------------------------------------------------------


def test_dashboard_settings_and_variables() -> None:
    dashboard = load()
    assert dashboard["uid"] == "attnserve"
    assert dashboard["title"] == "attnserve: attention serving"
    assert dashboard["schemaVersion"] == 39
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"]["from"] == "now-1h"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"
    [query] = [v for v in variable_queries() if v.name == "instance"]
    assert query.query == "label_values(attnserve_build_info, instance)"
    assert query.expr == "group by (instance) (attnserve_build_info)"


def test_datasource_variable_defaults_to_the_provisioned_datasource() -> None:
    text = (PROVISIONING / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    assert re.search(r"^\s+uid: prometheus$", text, re.M)
    assert re.search(r"^\s+type: prometheus$", text, re.M)
    assert re.search(r"^\s+url: http://prometheus:9090$", text, re.M)
    assert re.search(r"^\s+isDefault: true$", text, re.M)
    [variable] = [v for v in load()["templating"]["list"] if v["name"] == "datasource"]
    assert variable["current"]["value"] == "prometheus"


def test_dashboard_provider_loads_the_dashboards_directory() -> None:
    text = (PROVISIONING / "dashboards" / "attnserve.yaml").read_text(encoding="utf-8")
    assert re.search(r"^\s+type: file$", text, re.M)
    assert re.search(r"^\s+folder: attnserve$", text, re.M)
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards$", text, re.M)


def test_rows_hold_the_expected_panels_in_order() -> None:
    found: dict[str, list[str]] = {}
    row = None
    for panel in iter_panels(load()):
        if panel["type"] == "row":
            row = panel["title"]
            found[row] = []
        else:
            assert row is not None, f"panel {panel['title']!r} is above the first row"
            found[row].append(panel["title"])
    assert {r: tuple(titles) for r, titles in found.items()} == EXPECTED_ROWS


# --- every panel -----------------------------------------------------------------------------------------


def test_every_panel_queries_prometheus_through_the_datasource_variable() -> None:
    panels = _query_panels()
    assert panels
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["description"].strip(), f"{title}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"], f"{title}: no targets"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{title} / {target['refId']}: empty expr"
            assert target["datasource"] == DATASOURCE, f"{title} / {target['refId']}"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), title


def test_units_match_what_panels_show() -> None:
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in _query_panels()}
    assert units["Request latency p50 / p90 / p99 by sequence length"] == "s"
    assert units["Latency against sequence length"] == "s"
    assert units["Queue vs compute share of request time"] == "percentunit"
    assert units["Requests per second by API and code"] == "reqps"
    assert units["Errors by code"] == "reqps"
    assert units["Process memory (RSS)"] == "bytes"


def test_panel_ids_are_unique_and_the_grid_has_no_overlap() -> None:
    panels = list(iter_panels(load()))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "duplicate panel ids"
    # A collapsed row's panels keep the places they had when expanded, so compare each layer on its own.
    layers = [load()["panels"], *(p["panels"] for p in load()["panels"] if p["type"] == "row" and p["collapsed"])]
    for layer in layers:
        for p in layer:
            g = p["gridPos"]
            assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for a, b in combinations(layer, 2):
            ga, gb = a["gridPos"], b["gridPos"]
            apart = (
                ga["x"] + ga["w"] <= gb["x"]
                or gb["x"] + gb["w"] <= ga["x"]
                or ga["y"] + ga["h"] <= gb["y"]
                or gb["y"] + gb["h"] <= ga["y"]
            )
            assert apart, f"{a['title']!r} overlaps {b['title']!r}"


def test_bar_chart_orders_buckets_by_their_bound() -> None:
    """As text "1024" sorts before "16": the bar chart sorts on a numeric copy of seq_bucket."""
    [panel] = [p for p in _query_panels() if p["title"] == "Latency against sequence length"]
    assert panel["type"] == "barchart" and panel["options"]["xField"] == "seq_bucket"
    for target in panel["targets"]:
        assert target["instant"] and target["format"] == "table" and "[$__range]" in target["expr"]
        assert "label_join(" in target["expr"] and '"seq_order"' in target["expr"]
    steps = [t["id"] for t in panel["transformations"]]
    assert steps.index("convertFieldType") < steps.index("sortBy")
    [sort] = [t for t in panel["transformations"] if t["id"] == "sortBy"]
    assert sort["options"]["sort"] == [{"field": "seq_order", "desc": False}]


# --- every query -----------------------------------------------------------------------------------------


def test_every_metric_is_in_the_contract() -> None:
    for where, expr in _all_exprs():
        for name in _METRIC.findall(expr):
            metric = _contract_name(name)
            assert metric in CONTRACT_METRICS or metric in OTHER_METRICS, f"{where}: {name} is not exposed"


def test_every_selector_filters_on_the_instance_variable() -> None:
    for where, expr in (p for p in _all_exprs() if not p[0].startswith("variable ")):
        selectors = _SELECTOR.findall(expr)
        names = {m for m in _METRIC.findall(expr)} | ({"up"} if re.search(r"\bup\{", expr) else set())
        assert {name for name, _ in selectors} == names, f"{where}: a metric without a {{...}} selector"
        for name, matchers in selectors:
            found = {(label, op, value) for label, op, value in _MATCHER.findall(matchers)}
            assert ("instance", "=~", "$instance") in found, f"{where}: {name} not filtered on $instance"
            if _contract_name(name) in OTHER_METRICS:  # every job has these: pin the service's
                assert ("job", "=", "attnserve") in found, f'{where}: {name} without job="attnserve"'


def test_labels_in_matchers_and_groupings_exist_on_the_metrics() -> None:
    for where, expr in _all_exprs():
        metrics = {_contract_name(m) for m in _METRIC.findall(expr)}
        known = set(TARGET_LABELS)
        for metric in metrics:
            known.update(CONTRACT_LABELS.get(metric, ()))
        if "_bucket" in expr:
            known.add("le")
        for name, matchers in _SELECTOR.findall(expr):
            own = set(TARGET_LABELS) | set(CONTRACT_LABELS.get(_contract_name(name), ()))
            for label, _, _ in _MATCHER.findall(matchers):
                assert label in own, f"{where}: {name} has no label {label!r}"
        for group in _GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in known, f"{where}: grouping by {label!r}, which none of {sorted(metrics)} has"


def test_rate_windows_come_from_grafana() -> None:
    """Fixed windows break at other scrape intervals: $__rate_interval, or $__range for whole-range panels."""
    for where, expr in _all_exprs():
        for window in _RANGE.findall(expr):
            assert window in ("$__rate_interval", "$__range"), f"{where}: window [{window}]"


def test_latency_quantiles_count_answered_requests_only() -> None:
    for q in panel_queries():
        if "histogram_quantile" in q.expr and "attnserve_request_duration_seconds_bucket" in q.expr:
            assert 'code="OK"' in q.expr, f"{q.panel} / {q.ref_id}: fast refusals would pull quantiles down"


def test_concrete_leaves_no_grafana_variable() -> None:
    exprs = _all_exprs()
    assert len(exprs) > 20
    for where, expr in exprs:
        out = concrete(expr)
        assert "$" not in out, f"{where}: {out}"
        assert "[2m]" in out or "[30s]" in out or "[" not in out, f"{where}: {out}"


def test_concrete_substitutes_every_grafana_form() -> None:
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) + rate(x{instance=~"${instance:regex}"}[${__range}])'
    assert concrete(expr, instance="a|b") == 'rate(x{instance=~"a|b"}[30s]) + rate(x{instance=~"a|b"}[2m])'
    assert concrete("[[instance]] $__interval $__interval_ms $__range_s $__range_ms", range_="1h") == (
        ".* 5s 5000 3600 3600000"
    )
    assert concrete('up{instance=~"$instance"}', instance="host:8002") == 'up{instance=~"host:8002"}'
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        concrete('up{job="$job"}')
    with pytest.raises(ValueError, match="malformed"):
        concrete('up{instance=~"${instance"}')


def test_panel_queries_include_panels_in_collapsed_rows(tmp_path: Path) -> None:
    dashboard = load()
    top = dashboard["panels"]
    row_at = next(i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == "Model")
    row = top[row_at]
    row["collapsed"], row["panels"] = True, top[row_at + 1 :]
    dashboard["panels"] = top[: row_at + 1]
    path = tmp_path / "collapsed.json"
    path.write_text(json.dumps(dashboard), encoding="utf-8")
    assert panel_queries(path) == panel_queries()
    up = next(q for q in panel_queries(path) if q.panel == "Scrape target up")
    assert up == PanelQuery("Scrape target up", "A", 'up{instance=~"$instance", job="attnserve"}', True)


def test_instant_queries_are_the_tables_stats_and_bar_chart() -> None:
    instant = {q.panel for q in panel_queries() if q.instant}
    assert instant == {"Latency against sequence length", "Model, provider and build", "Scrape target up"}


def test_promql_parses(tmp_path: Path) -> None:
    """Every concrete expression, as a recording rule, through `promtool check rules` (Prometheus' parser)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make system-deps` installs it (Debian package prometheus)"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    exprs = _all_exprs()
    for i, (_, expr) in enumerate(exprs):
        # A JSON string is a valid YAML double-quoted scalar: no quoting rules of our own.
        lines += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(concrete(expr))}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        where = "\n".join(f"expr_{i}: {w}" for i, (w, _) in enumerate(exprs))
        pytest.fail(f"promtool check rules failed:\n{done.stdout}{done.stderr}\n{where}")
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout
