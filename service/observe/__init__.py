"""Observation: metrics and their /metrics server, per-model statistics, the access log; one recorder per request."""
