"""Quantiles from a scraped histogram follow Prometheus' histogram_quantile: linear within a bucket, bounded by
the exact values; the difference of two scrapes; the fitted growth exponent."""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tests.load.histograms import count, histograms, quantile, subtract
from tests.load.latency_report import fit_power


def _page(values: dict[str, list[float]]) -> str:
    registry = CollectorRegistry()
    h = Histogram("lat_seconds", "x", ["seq_bucket", "code"], buckets=(0.001, 0.01, 0.1, 1.0), registry=registry)
    for bucket, seconds in values.items():
        for s in seconds:
            h.labels(bucket, "OK").observe(s)
    h.labels("16", "INTERNAL").observe(0.5)  # filtered out by the match
    return generate_latest(registry).decode()


def test_quantiles_interpolate_within_the_bucket_like_prometheus() -> None:
    found = histograms(_page({"16": [0.002] * 50 + [0.05] * 50}), "lat_seconds", "seq_bucket", {"code": "OK"})
    buckets = found["16"]
    assert count(buckets) == 100
    assert math.isclose(quantile(0.5, buckets), 0.01)  # rank 50 ends exactly at the 0.01 bound
    assert math.isclose(quantile(0.75, buckets), 0.01 + 0.09 * 0.5)  # halfway through the (0.01, 0.1] bucket
    assert quantile(0.99, {1.0: 0.0, math.inf: 0.0}) != quantile(0.99, {1.0: 0.0, math.inf: 0.0})  # NaN
    assert quantile(0.99, {1.0: 1.0, math.inf: 5.0}) == 1.0  # in +Inf: the highest finite bound


def test_a_quantile_lies_within_the_bucket_of_the_exact_value() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(-4, 1, 2000).tolist()
    buckets = histograms(_page({"64": values}), "lat_seconds", "seq_bucket")["64"]
    bounds = [0.0, 0.001, 0.01, 0.1, 1.0]
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(values, q))
        low = max(b for b in bounds if b <= exact)
        high = min(b for b in bounds[1:] if b >= exact)
        assert low <= quantile(q, buckets) <= high


def test_the_difference_of_two_scrapes_is_what_happened_between_them() -> None:
    before = histograms(_page({"16": [0.002] * 3}), "lat_seconds", "seq_bucket", {"code": "OK"})
    after = histograms(_page({"16": [0.002] * 3 + [0.05] * 4}), "lat_seconds", "seq_bucket", {"code": "OK"})
    assert count(subtract(after, before)["16"]) == 4


def test_the_fitted_exponent_recovers_a_power_law() -> None:
    seqs = [16, 64, 256, 1024, 4096]
    fit = fit_power(seqs, [3.0 * s**1.7 for s in seqs])
    assert fit is not None and math.isclose(fit.exponent, 1.7) and math.isclose(fit.at(100), 3.0 * 100**1.7)
    assert fit_power([16], [1.0]) is None
