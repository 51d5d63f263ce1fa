"""The metrics module: names as documented, bucket labels, exemplars, and the null variant."""

from __future__ import annotations

from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from service.observe.metrics import SERVICE_METRICS, Metrics, NullMetrics


def _exposed_names(metrics: Metrics) -> set[str]:
    names = set()
    for family in metrics.registry.collect():
        if family.name.startswith("attnserve_"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_documented_names_are_the_exposed_ones() -> None:
    assert _exposed_names(Metrics()) == set(SERVICE_METRICS)


def test_a_request_lands_in_its_seq_bucket_with_its_id_as_exemplar() -> None:
    metrics = Metrics((16, 64))
    metrics.observe_request("v1", "Attend", "OK", 40, 0.003, 40, "req-7")
    metrics.observe_request("v1", "Attend", "INVALID_ARGUMENT", None, 0.0001, 0, "")
    metrics.observe_request("kserve", "ModelInfer", "OK", 100, 0.2, 100, "req-8")
    text = openmetrics(metrics.registry).decode()
    assert 'seq_bucket="64"' in text and 'seq_bucket="none"' in text and 'seq_bucket="+Inf"' in text
    assert '# {request_id="req-7"} 0.003' in text
    assert 'attnserve_tokens_total{seq_bucket="64"} 40.0' in text  # failed requests add no tokens
    assert 'attnserve_tokens_total{seq_bucket="none"}' not in text


def test_a_traced_request_adds_its_trace_id_to_the_exemplar_within_openmetrics_cap() -> None:
    metrics = Metrics((16,))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    metrics.observe_request("v1", "Attend", "OK", 8, 0.003, 8, "r" * 200, trace_id)
    text = openmetrics(metrics.registry).decode()
    exemplar = text.split(" # ", 1)[1].split("}", 1)[0] + "}"
    assert exemplar == '{request_id="' + "r" * 64 + f'",trace_id="{trace_id}"}}'
    assert len("request_id" + "r" * 64 + "trace_id" + trace_id) <= 128  # names and values, as OpenMetrics counts


def test_a_run_records_compute_batch_and_padding() -> None:
    metrics = Metrics()
    metrics.observe_run("cpu", "plain", 3, 100, 60, 0.01)
    text = openmetrics(metrics.registry).decode()
    assert (
        'attnserve_compute_duration_seconds_count{batch_bucket="4",graph="plain",provider="cpu",seq_bucket="256"} 1'
        in text
    )
    assert "attnserve_padding_ratio_sum 0.2" in text and "attnserve_batch_size_sum 3.0" in text


def test_null_metrics_take_the_same_calls_and_serve_nothing() -> None:
    metrics = NullMetrics()
    metrics.observe_request("v1", "Attend", "OK", 40, 0.003, 40, "x")
    metrics.observe_run("cpu", "plain", 1, 16, 0, 0.001)
    metrics.observe_queue(16, 0.001)
    metrics.observe_dropped("deadline")
    assert not metrics.enabled and metrics.serve("127.0.0.1", 0) == 0
