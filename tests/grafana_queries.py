"""The PromQL of the Grafana dashboard, made runnable against Prometheus without Grafana.

Grafana is not available to the tests, so they check the dashboard the way Grafana would use it: every
panel target (`panel_queries`) and every templating variable (`variable_queries`), with Grafana's own
variables replaced by `concrete()` the way Grafana would interpolate them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "attnserve.json"

# Panels without queries of their own.
LAYOUT_PANEL_TYPES = ("row", "text")

# Grafana's template variable forms: $name, ${name}, ${name:format}, ${name.field}, [[name]], [[name:format]].
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?:\.[^:}]+)?(?::[^}]+)?\}|\[\[(\w+?)(?::\w+)?\]\]")
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel."""

    panel: str  # the panel's title
    ref_id: str
    expr: str  # as written in the dashboard, Grafana variables included
    instant: bool  # evaluated once at the range's end (/api/v1/query), else over the range (query_range)


@dataclass(frozen=True)
class VariableQuery:
    """One query-type templating variable: `label_values(metric, label)` fills its drop-down."""

    name: str
    query: str  # as Grafana runs it, e.g. label_values(attnserve_build_info, instance)
    label: str  # the label whose values become the options
    expr: str  # PromQL returning one series per option, each carrying `label`


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel in page order, rows included; a collapsed row's panels come right after the row."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # only collapsed rows nest their panels


def panel_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    """Every target of every panel, in page order (panels nested in collapsed rows included)."""
    queries = []
    for panel in iter_panels(load(path)):
        for target in panel.get("targets", []):
            # Grafana runs a target as instant when asked and not also as a range query.
            instant = bool(target.get("instant")) and not target.get("range", False)
            queries.append(PanelQuery(panel["title"], target["refId"], target.get("expr", ""), instant))
    return queries


def variable_queries(path: Path = DASHBOARD) -> list[VariableQuery]:
    """The query-type templating variables, each with PromQL that returns what its drop-down lists."""
    out = []
    for variable in load(path).get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query.get("query", "") if isinstance(query, dict) else query  # Grafana ≥ 10 stores an object
        match = _LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(f"variable {variable['name']}: only label_values(...) is supported, got {text!r}")
        label = match["label"]
        selector = match["metric"] or f'{{{label}!=""}}'
        out.append(VariableQuery(variable["name"], text, label, f"group by ({label}) ({selector})"))
    return out


def _duration_seconds(duration: str) -> float:
    """Prometheus duration ("1h30m", "30s") in seconds."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _SECONDS[u] for n, u in parts)


def concrete(
    expr: str, rate_interval: str = "30s", range_: str = "2m", interval: str = "5s", instance: str = ".*"
) -> str:
    """`expr` with Grafana's variables replaced as Grafana would, ready for Prometheus' HTTP API.

    `instance` is the regex Grafana puts in for `$instance` (".*" is the dashboard's "All"). Raises
    ValueError if the expr uses any other variable, so a new one cannot slip past the tests.
    """
    values = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__interval_ms": str(round(_duration_seconds(interval) * 1000)),
        "__range": range_,
        "__range_s": str(round(_duration_seconds(range_))),
        "__range_ms": str(round(_duration_seconds(range_) * 1000)),
        "instance": instance,
    }

    def substitute(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name not in values:
            raise ValueError(f"unknown Grafana variable {match.group(0)!r} in {expr!r}")
        return values[name]

    # A "$" outside every well-formed variable (say "${instance") would reach Prometheus as is.
    stray = _VARIABLE.sub("", expr)
    if "$" in stray or "[[" in stray:
        raise ValueError(f"malformed Grafana variable in {expr!r}")
    return _VARIABLE.sub(substitute, expr)
