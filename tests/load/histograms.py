"""Prometheus histograms read from a /metrics page, and quantiles computed the way Prometheus computes them.

`make report-latency` scrapes the service before and after its sweep and reports the difference, so its
figures are the dashboards' figures (bucket interpolation included), not the client's own timings.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

# {group label value: {le: cumulative count}}
Histograms = dict[str, dict[float, float]]


def scrape(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def histograms(text: str, metric: str, by: str, match: Mapping[str, str] | None = None) -> Histograms:
    """Cumulative bucket counts of `metric` (its base name), summed over every label but `by`, keeping only
    series whose labels equal `match`."""
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            labels = sample.labels
            if any(labels.get(k) != v for k, v in (match or {}).items()):
                continue
            out[labels[by]][float(labels["le"])] += sample.value
    return {group: dict(buckets) for group, buckets in out.items()}


def subtract(after: Histograms, before: Histograms) -> Histograms:
    """What was observed between two scrapes."""
    return {
        group: {le: count - before.get(group, {}).get(le, 0.0) for le, count in buckets.items()}
        for group, buckets in after.items()
    }


def count(buckets: Mapping[float, float]) -> float:
    return buckets.get(math.inf, 0.0)


def quantile(q: float, buckets: Mapping[float, float]) -> float:
    """histogram_quantile(q) over cumulative counts: linear within the bucket the rank falls in; a rank in
    the +Inf bucket returns the highest finite bound (as Prometheus does); NaN without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        cumulative = buckets[upper]
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            if cumulative == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower
