"""What the server says about the model it serves: one description behind the KServe metadata and config and
attnserve.v1's ModelInfo, built once from the engine, the batcher's policy and the limits."""

from __future__ import annotations

from dataclasses import dataclass

from service.core.limits import Limits

MODEL_VERSION = "1"  # one version is served; the protocols' version fields name it


@dataclass(frozen=True)
class Route:
    """Sequences of length ≤ up_to (after the previous route's) run this graph, in this form."""

    masked: bool
    up_to: int
    graph: str
    form: str


@dataclass(frozen=True)
class Batching:
    max_sequences: int  # per engine run; 1 = batching off
    max_queue_delay_us: int
    max_queue_requests: int
    summary: str  # the whole policy in words, as the start-up log states it


@dataclass(frozen=True)
class ModelDescription:
    d_model: int
    num_heads: int
    head_dim: int
    causal: bool
    provider: str  # cpu | cuda
    instances: int  # engine threads: runs in flight at once
    routes: tuple[Route, ...]
    weights_kind: str
    weights_sha256: str
    weights_detail: str
    limits: Limits
    batching: Batching
