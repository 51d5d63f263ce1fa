"""Generate the Grafana dashboard `deploy/grafana/dashboards/attnserve.json` from the panels declared here.

    python scripts/gen_dashboard.py [--check]

Rows of panels of PromQL targets are plain data below; `render()` turns them into Grafana's JSON model
(schemaVersion 39) with sorted keys and a computed layout, so the same code always gives the same bytes.
`--check` writes nothing and exits 1 when the committed file differs (tests/unit/test_dashboard.py runs the
same comparison). Edit this file, never the JSON.

Every query reads the service's raw metrics (service/observe/metrics.py), not the recording rules of
deploy/prometheus/rules.yml, so the dashboard works against any Prometheus that scrapes the service.
Every selector filters on `$instance`; rate windows are `$__rate_interval` (at least four scrapes).
Stdlib only: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "grafana" / "dashboards" / "attnserve.json"
HINT = "run `python scripts/gen_dashboard.py` and commit deploy/grafana/dashboards/attnserve.json"

# Panels take the data source from the `datasource` variable, so one dashboard serves any Prometheus.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The one provisioned data source (deploy/grafana/provisioning/datasources/prometheus.yaml): the default.
PROVISIONED = {"name": "Prometheus", "uid": "prometheus"}
INSTANCE = 'instance=~"$instance"'
# process_* and up exist for every job Prometheus scrapes (Prometheus itself included): pin the job.
SERVICE_JOB = 'job="attnserve"'
WINDOW = "$__rate_interval"
GRID_WIDTH = 24

JsonDict = dict[str, Any]


# --- PromQL building blocks ------------------------------------------------------------------------------


def sel(metric: str, *matchers: str) -> str:
    """A selector of `metric` on the chosen instances, plus any further matchers."""
    return f"{metric}{{{', '.join((INSTANCE, *matchers))}}}"


def rate(metric: str, *matchers: str, window: str = WINDOW) -> str:
    return f"rate({sel(metric, *matchers)}[{window}])"


def sum_rate(metric: str, *matchers: str, by: tuple[str, ...] = (), window: str = WINDOW) -> str:
    grouping = f" by ({', '.join(by)}) " if by else ""
    return f"sum{grouping}({rate(metric, *matchers, window=window)})"


def quantile(q: float, histogram: str, *matchers: str, by: tuple[str, ...] = (), window: str = WINDOW) -> str:
    """histogram_quantile over buckets summed across instances (the only correct way to merge them)."""
    return f"histogram_quantile({q}, {sum_rate(histogram + '_bucket', *matchers, by=('le', *by), window=window)})"


def mean(histogram: str, *matchers: str) -> str:
    """Mean observation over the rate window: rate of the sum over rate of the count."""
    return f"{sum_rate(histogram + '_sum', *matchers)} / {sum_rate(histogram + '_count', *matchers)}"


def mean_and_p90(histogram: str) -> tuple[Target, Target]:
    """A per-run histogram's typical value and its upper tail, as two series of one panel."""
    return Target(mean(histogram), "mean"), Target(quantile(0.9, histogram), "p90")


def zero_when_absent(expr: str) -> str:
    """`expr`, or 0 while the service is scraped: a labelled counter has no series before its first event,
    and an empty panel reads as "broken" where 0 means "none happened"."""
    return f"{expr} or ({sum_rate('attnserve_requests_total')} * 0)"


def seq_ordered(expr: str) -> str:
    """Add a numeric `seq_order` label (the bucket bound, "+Inf" as 1e9) that Grafana can sort rows by:
    as text "1024" sorts before "16", and Grafana turns "+Inf" into null when it converts to a number.
    label_join copies the label without a `$1` back-reference, so nothing in the expr looks like a variable."""
    copied = f'label_join({expr}, "seq_order", "", "seq_bucket")'
    return f'label_replace({copied}, "seq_order", "1e9", "seq_bucket", "[+]Inf")'


# --- the panel model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False  # one evaluation at the range's end (tables, bar charts, stats), not a series
    format: str = "time_series"  # or "table", "heatmap"


@dataclass(frozen=True)
class Panel:
    title: str
    type: str  # timeseries | barchart | heatmap | table | stat
    description: str
    targets: tuple[Target, ...]
    unit: str
    w: int = 12
    h: int = 8
    axis_label: str = ""
    log_scale: bool = False  # latency spans 50 µs … seconds across sequence lengths
    max: float | None = None
    options: JsonDict = field(default_factory=dict)  # merged over the type's defaults
    mappings: tuple[JsonDict, ...] = ()
    transformations: tuple[JsonDict, ...] = ()


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]
    collapsed: bool = False  # Grafana nests a collapsed row's panels inside the row


# --- the dashboard ---------------------------------------------------------------------------------------

OK = 'code="OK"'
REQUEST = "attnserve_request_duration_seconds"
QUEUE = "attnserve_queue_duration_seconds"
COMPUTE = "attnserve_compute_duration_seconds"

LATENCY = Row(
    "Latency",
    (
        Panel(
            "Request latency p50 / p90 / p99 by sequence length",
            "timeseries",
            "Latency of answered requests per sequence-length bucket: attention costs O(n²), so compare within a "
            "bucket.",
            tuple(
                Target(quantile(q, REQUEST, OK, by=("seq_bucket",)), f"p{round(q * 100)} seq≤{{{{seq_bucket}}}}")
                for q in (0.5, 0.9, 0.99)
            ),
            unit="s",
            log_scale=True,
        ),
        Panel(
            "Latency against sequence length",
            "barchart",
            "p50 and p99 of answered requests over the whole dashboard range, one bar group per sequence-length "
            "bucket.",
            tuple(
                Target(
                    seq_ordered(quantile(q, REQUEST, OK, by=("seq_bucket",), window="$__range")),
                    instant=True,
                    format="table",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
            log_scale=True,
            options={"xField": "seq_bucket"},
            transformations=(
                {"id": "merge", "options": {}},  # one row per seq_bucket, a value column per query
                {
                    "id": "convertFieldType",
                    "options": {"conversions": [{"targetField": "seq_order", "destinationType": "number"}]},
                },
                {"id": "sortBy", "options": {"sort": [{"field": "seq_order", "desc": False}]}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "seq_order": True},
                        "indexByName": {"seq_bucket": 0, "Value #A": 1, "Value #B": 2},
                        "renameByName": {"Value #A": "p50", "Value #B": "p99"},
                    },
                },
            ),
        ),
        Panel(
            "Request latency heatmap",
            "heatmap",
            "Answered requests per second in each latency bucket: a second band means a second population.",
            (Target(sum_rate(REQUEST + "_bucket", OK, by=("le",)), "{{le}}", format="heatmap"),),
            unit="reqps",
            w=24,
        ),
    ),
)

TIME = Row(
    "Where the time goes",
    (
        Panel(
            "Queue vs compute share of request time",
            "timeseries",
            "Time waiting for an engine thread and onnxruntime run time (counted once per batch) as a share of "
            "all request time.",
            (
                Target(f"{sum_rate(QUEUE + '_sum')} / {sum_rate(REQUEST + '_sum')}", "queue"),
                Target(f"{sum_rate(COMPUTE + '_sum')} / {sum_rate(REQUEST + '_sum')}", "compute"),
            ),
            unit="percentunit",
            w=8,
        ),
        Panel(
            "Queue and compute p99 by sequence length",
            "timeseries",
            "Rising queue p99 with flat compute p99 means too few engine threads, not a slower model.",
            (
                Target(quantile(0.99, QUEUE, by=("seq_bucket",)), "queue seq≤{{seq_bucket}}"),
                Target(quantile(0.99, COMPUTE, by=("seq_bucket",)), "compute seq≤{{seq_bucket}}"),
            ),
            unit="s",
            w=8,
            log_scale=True,
        ),
        Panel(
            "Engine runs by provider and graph",
            "timeseries",
            "Which ONNX graph the routing table picks, per execution provider, in runs per second.",
            (Target(sum_rate(COMPUTE + "_count", by=("provider", "graph")), "{{provider}} {{graph}}"),),
            unit="ops",
            w=8,
            axis_label="runs/s",
        ),
    ),
)

THROUGHPUT = Row(
    "Throughput & batching",
    (
        Panel(
            "Requests per second by API and code",
            "timeseries",
            "Answered requests per second by API and gRPC status code.",
            (Target(sum_rate("attnserve_requests_total", by=("api", "code")), "{{api}} {{code}}"),),
            unit="reqps",
        ),
        Panel(
            "Tokens per second",
            "timeseries",
            "Tokens of answered requests per second (batch × sequence length), in total and per bucket.",
            (
                Target(sum_rate("attnserve_tokens_total"), "total"),
                Target(sum_rate("attnserve_tokens_total", by=("seq_bucket",)), "seq≤{{seq_bucket}}"),
            ),
            unit="short",
            axis_label="tokens/s",
        ),
        Panel(
            "Batch size",
            "timeseries",
            "Sequences per engine run: near 1 under load means the batcher finds nothing to combine.",
            mean_and_p90("attnserve_batch_size"),
            unit="short",
            axis_label="sequences",
        ),
        Panel(
            "Padding ratio",
            "timeseries",
            "Share of computed tokens that are padding (batches pad to their longest sequence): wasted compute.",
            mean_and_p90("attnserve_padding_ratio"),
            unit="percentunit",
            max=1.0,
        ),
    ),
)

SATURATION = Row(
    "Saturation & errors",
    (
        Panel(
            "In-flight requests and queue depth",
            "timeseries",
            "Requests accepted and not yet answered, and those waiting for an engine thread (sampled at scrape).",
            (
                Target(f"sum by (instance) ({sel('attnserve_inflight_requests')})", "in flight {{instance}}"),
                Target(f"sum by (instance) ({sel('attnserve_queue_depth')})", "queued {{instance}}"),
            ),
            unit="short",
        ),
        Panel(
            "Errors by code",
            "timeseries",
            "Requests answered with a status other than OK, per second, by gRPC code.",
            (
                Target(sum_rate("attnserve_requests_total", 'code!="OK"', by=("code",)), "{{code}}"),
                Target(zero_when_absent(sum_rate("attnserve_requests_total", 'code!="OK"')), "all errors"),
            ),
            unit="reqps",
        ),
        Panel(
            "Dropped requests by reason",
            "timeseries",
            "Requests dropped before compute (deadline passed, client cancelled, queue full), per second.",
            (
                Target(sum_rate("attnserve_dropped_requests_total", by=("reason",)), "{{reason}}"),
                Target(zero_when_absent(sum_rate("attnserve_dropped_requests_total")), "all dropped"),
            ),
            unit="reqps",
        ),
        Panel(
            "Process memory (RSS)",
            "timeseries",
            "Resident memory per instance; it stays at its high-water mark while freed buffers are kept.",
            (Target(f"sum by (instance) ({sel('process_resident_memory_bytes', SERVICE_JOB)})", "{{instance}}"),),
            unit="bytes",
            w=6,
        ),
        Panel(
            "Process CPU",
            "timeseries",
            "CPU time per second per instance: 1 is one core fully busy.",
            (Target(sum_rate("process_cpu_seconds_total", SERVICE_JOB, by=("instance",)), "{{instance}}"),),
            unit="short",
            w=6,
            axis_label="CPU cores",
        ),
    ),
)

MODEL_COLUMNS = ("instance", "job", "model", "provider", "d_model", "heads", "version", "python", "weights_sha256")
MODEL = Row(
    "Model",
    (
        Panel(
            "Model, provider and build",
            "table",
            "What each instance serves: model dimensions, execution provider, weights checksum and build.",
            (
                Target(
                    f"{sel('attnserve_model_info')} * on (job, instance) group_left (version, python) "
                    f"{sel('attnserve_build_info')}",
                    instant=True,
                    format="table",
                ),
            ),
            unit="short",
            w=18,
            h=6,
            transformations=(
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "Value": True, "__name__": True},
                        # Who, what, where it runs, then the long checksum last.
                        "indexByName": {name: i for i, name in enumerate(MODEL_COLUMNS)},
                    },
                },
            ),
        ),
        Panel(
            "Scrape target up",
            "stat",
            "Whether Prometheus reached each instance's /metrics at the last scrape.",
            (Target(sel("up", SERVICE_JOB), "{{instance}}", instant=True),),
            unit="short",
            w=6,
            h=6,
            mappings=(
                {
                    "type": "value",
                    "options": {
                        "0": {"color": "red", "index": 0, "text": "down"},
                        "1": {"color": "green", "index": 1, "text": "up"},
                    },
                },
            ),
        ),
    ),
)

ROWS = (LATENCY, TIME, THROUGHPUT, SATURATION, MODEL)


# --- rendering -------------------------------------------------------------------------------------------

_LEGEND = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True}
_TOOLTIP = {"mode": "multi", "sort": "desc"}


def _type_options(panel: Panel) -> JsonDict:
    """Grafana's options for each panel type, before the panel's own."""
    if panel.type == "timeseries":
        return {"legend": _LEGEND, "tooltip": _TOOLTIP}
    if panel.type == "barchart":
        return {
            "barWidth": 0.9,
            "groupWidth": 0.7,
            "legend": _LEGEND,
            "orientation": "vertical",
            "showValue": "auto",
            "stacking": "none",
            "tooltip": _TOOLTIP,
            "xTickLabelRotation": 0,
        }
    if panel.type == "heatmap":
        return {
            "calculate": False,  # Prometheus already bucketed: draw its `le` buckets as they are
            "cellGap": 1,
            "cellValues": {"unit": panel.unit},
            "color": {"exponent": 0.5, "mode": "scheme", "scale": "exponential", "scheme": "Oranges", "steps": 64},
            "filterValues": {"le": 1e-9},  # hide empty cells
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "unit": "s"},
        }
    if panel.type == "table":
        return {"cellHeight": "sm", "footer": {"show": False}, "showHeader": True}
    if panel.type == "stat":
        return {
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
        }
    raise ValueError(f"panel {panel.title!r}: unknown type {panel.type!r}")


def _field_defaults(panel: Panel) -> JsonDict:
    defaults: JsonDict = {"unit": panel.unit}
    if panel.type in ("timeseries", "barchart"):
        custom: JsonDict = {"axisLabel": panel.axis_label, "axisPlacement": "auto"}
        if panel.type == "timeseries":
            custom |= {"drawStyle": "line", "fillOpacity": 0, "lineWidth": 1, "showPoints": "never"}
        else:
            custom |= {"fillOpacity": 80, "lineWidth": 1}
        if panel.log_scale:
            custom["scaleDistribution"] = {"log": 10, "type": "log"}
        else:
            custom["scaleDistribution"] = {"type": "linear"}
            defaults["min"] = 0  # rates, counts and shares are never negative
        defaults["custom"] = custom
        defaults["color"] = {"mode": "palette-classic"}
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.mappings:
        defaults["mappings"] = list(panel.mappings)
    if panel.type == "stat":
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "red", "value": None}]}
    return defaults


def _target(target: Target, ref_id: str) -> JsonDict:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "exemplar": False,
        "expr": target.expr,
        "format": target.format,
        "instant": target.instant,
        "legendFormat": target.legend or "__auto",
        "range": not target.instant,
        "refId": ref_id,
    }


def _panel(panel: Panel, panel_id: int, grid: JsonDict) -> JsonDict:
    if len(panel.targets) > 26:
        raise ValueError(f"panel {panel.title!r}: more targets than ref ids A..Z")
    return {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": {"defaults": _field_defaults(panel), "overrides": []},
        "gridPos": grid,
        "id": panel_id,
        "options": _type_options(panel) | panel.options,
        "targets": [_target(t, chr(ord("A") + i)) for i, t in enumerate(panel.targets)],
        "title": panel.title,
        "transformations": list(panel.transformations),
        "type": panel.type,
    }


def _panels(rows: tuple[Row, ...]) -> list[JsonDict]:
    """Rows and their panels, laid out left to right and wrapped at the grid's width."""
    out: list[JsonDict] = []
    next_id = 1
    y = 0
    for row in rows:
        row_json: JsonDict = {
            "collapsed": row.collapsed,
            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
            "id": next_id,
            "panels": [],
            "title": row.title,
            "type": "row",
        }
        next_id += 1
        y += 1
        out.append(row_json)
        x = line_height = 0
        for panel in row.panels:
            if x + panel.w > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            rendered = _panel(panel, next_id, {"h": panel.h, "w": panel.w, "x": x, "y": y})
            next_id += 1
            # A collapsed row carries its panels; an expanded one is followed by them.
            (row_json["panels"] if row.collapsed else out).append(rendered)
            x += panel.w
            line_height = max(line_height, panel.h)
        y += line_height
    return out


def _templating() -> list[JsonDict]:
    instances = "label_values(attnserve_build_info, instance)"
    return [
        {
            "current": {"selected": False, "text": PROVISIONED["name"], "value": PROVISIONED["uid"]},
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
            "type": "datasource",
        },
        {
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "datasource": DATASOURCE,
            "definition": instances,
            "hide": 0,
            "includeAll": True,
            "label": "Instance",
            "multi": True,
            "name": "instance",
            "options": [],
            "query": {"qryType": 1, "query": instances, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,  # on time range change: replicas come and go
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
            "type": "query",
        },
    ]


def dashboard(rows: tuple[Row, ...] = ROWS) -> JsonDict:
    """The dashboard as Grafana's JSON model."""
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "attnserve: multi-head self-attention over gRPC. Generated by scripts/gen_dashboard.py.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,  # shared crosshair: line up latency, queue and saturation at one instant
        "id": None,
        "links": [],
        "panels": _panels(rows),
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["attnserve"],
        "templating": {"list": _templating()},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "attnserve: attention serving",
        "uid": "attnserve",
        "version": 1,
        "weekStart": "",
    }


def render(rows: tuple[Row, ...] = ROWS) -> str:
    """The dashboard file's exact text: sorted keys, indent 2, UTF-8 as is, trailing newline."""
    return json.dumps(dashboard(rows), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed dashboard differs")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date: {HINT}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
