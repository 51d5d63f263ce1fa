"""Observation: metrics and their /metrics server, per-model statistics, the access log, the main log's format;
one recorder per request."""
