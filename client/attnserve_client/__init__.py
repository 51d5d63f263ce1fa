"""attnserve-client: the Python client of attnserve.v1 (numpy in, numpy out) and the `attnserve-client` command.

    from attnserve_client import AttentionClient, WeightsQuery

    with AttentionClient("127.0.0.1:8001") as client:
        result = client.attend(x, lengths=[5, 7], weights=WeightsQuery(positions=(3,), top_k=5))

A distribution of its own (grpcio, protobuf, numpy): it imports nothing of the server. `explain` (the
attnserve_client.explain package) needs the `explain` extra.
"""

from attnserve_client.channel_policy import balanced_options, replicas_target
from attnserve_client.client import (
    DEFAULT_TARGET,
    UNLIMITED,
    AsyncAttentionClient,
    AttendResult,
    AttentionClient,
    StreamAnswer,
    StreamError,
    StreamRequest,
    Timing,
    UsageError,
    WeightsQuery,
)

__all__ = [
    "DEFAULT_TARGET",
    "UNLIMITED",
    "AsyncAttentionClient",
    "AttendResult",
    "AttentionClient",
    "StreamAnswer",
    "StreamError",
    "StreamRequest",
    "Timing",
    "UsageError",
    "WeightsQuery",
    "balanced_options",
    "replicas_target",
]
