"""Dynamic batching, the logic without the threads: which waiting requests run together, and how a batch is
padded and split back.

Requests wait in one queue per sequence-length bucket (service/core/seq_buckets.py), so a batch pads short
sequences only up to lengths of their own kind. A bucket's batch is ready when it has max_batch_size
sequences, when taking the next request would pass the token budget (rows × padded length), or when its
oldest request has waited max_queue_delay; the oldest ready bucket goes first. A batch starts with its
bucket's oldest request and takes the waiting ones nearest to it in length, as long as the padding stays
within max_padding, so no request waits forever and little compute goes to padding. Inside a batch every
sequence is padded to the longest and the key padding mask marks the padding, so each answer equals the
one its request would get alone (the masked keys get zero weight; the padded query rows are dropped).

The queue is bounded in requests, in tokens and in estimated compute time (each request's cost from its
bucket's recent runs): `put` refuses a request that would pass a bound, at once, naming the bound (the
service answers RESOURCE_EXHAUSTED); into an empty queue any request fits, so no bound shuts out a
request the limits allow. The time bound is what keeps an accepted request's wait short under overload,
whatever the mix of lengths: a request count or token count means very different waits at 16 and 4096.
Weights requests run alone: they need the weights graph and their [heads, seq, seq] output is per request
anyway.

service/engine/batcher.py runs the batches on the engine's threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.seq_buckets import DEFAULT_SEQ_BUCKETS, seq_bucket
from service.core.types import AttentionRequest

WEIGHTS = "weights"  # the queue of weights requests, beside the sequence-length buckets


class QueueFull(Exception):
    """The queue is at one of its bounds; the message names it."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 8  # sequences (rows) per batch
    max_batch_tokens: int = 16384  # rows × padded length per batch
    max_queue_delay_s: float = 0.0  # the longest a request waits for company while a worker is free
    max_padding: float = 0.15  # padded share of a batch's computed tokens that companions may add
    max_queue_requests: int = 256
    max_queue_tokens: int = 65536
    max_queue_wait_s: float = 0.0  # estimated compute waiting (engine threads' seconds); 0 = no bound
    seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS

    def describe(self) -> str:
        """The policy in one line: the start-up log and ModelConfig's parameters say it the same way."""
        runs = (
            f"up to {self.max_batch_size} sequences and {self.max_batch_tokens} tokens per run, grouped by "
            f"sequence-length bucket, padding ≤ {self.max_padding:.0%}, delay {self.max_queue_delay_s * 1e6:g} µs"
            if self.max_batch_size > 1
            else "off (each request runs alone)"
        )
        return (
            f"{runs}; queue ≤ {self.max_queue_requests} requests, {self.max_queue_tokens} tokens and "
            f"{self.max_queue_wait_s * 1e3:g} ms of estimated compute"
        )


@dataclass
class Waiting:
    """One queued request and when it arrived (time.perf_counter())."""

    request: AttentionRequest
    enqueued: float
    tag: Any = None  # the caller's handle for the answer (the batcher's future), untouched here
    cost_s: float = 0.0  # estimated compute seconds (RunTimes), summed over the queue to bound its wait

    @property
    def rows(self) -> int:
        return self.request.batch_size

    @property
    def tokens(self) -> int:
        return self.request.batch_size * self.request.seq_len


@dataclass
class Batch:
    """Requests that run as one: their stacked, padded input and where each one's rows and length are."""

    members: list[Waiting]
    hidden_states: np.ndarray  # (rows, longest, d_model) float32
    mask: np.ndarray | None  # (rows, longest) int32, 1 = real token; None when nothing is padding
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (first row, end row, seq_len) per member

    @property
    def rows(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def padded_tokens(self) -> int:
        """Tokens computed that are padding (masked out), whether batching or the client put them there."""
        computed = self.hidden_states.shape[0] * self.hidden_states.shape[1]
        return computed - (int(self.mask.sum()) if self.mask is not None else computed)

    def split(self, output: np.ndarray) -> list[np.ndarray]:
        """Each member's rows and length of the batch output: views, no copies."""
        return [output[start:end, :seq] for start, end, seq in self.spans]


def assemble(members: Sequence[Waiting]) -> Batch:
    """Stack the members' sequences, each padded to the longest, with the key padding mask."""
    requests = [m.request for m in members]
    if len(requests) == 1:  # alone: the request as it came, no copy
        only = requests[0]
        return Batch(list(members), only.hidden_states, only.mask, [(0, only.batch_size, only.seq_len)])
    longest = max(r.seq_len for r in requests)
    rows = sum(r.batch_size for r in requests)
    width = requests[0].hidden_states.shape[2]
    x = np.zeros((rows, longest, width), dtype=np.float32)
    mask = np.zeros((rows, longest), dtype=np.int32)
    spans = []
    row = 0
    for r in requests:
        end = row + r.batch_size
        x[row:end, : r.seq_len] = r.hidden_states
        mask[row:end, : r.seq_len] = 1 if r.mask is None else r.mask
        spans.append((row, end, r.seq_len))
        row = end
    return Batch(list(members), x, None if mask.all() else mask, spans)


class BatchQueue:
    """Waiting requests by sequence bucket, bounded in requests, tokens and estimated compute; hands out ready
    batches."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._buckets: dict[str, deque[Waiting]] = {}
        self.requests = 0
        self.tokens = 0
        self.cost_s = 0.0  # estimated compute of everything waiting

    def put(self, waiting: Waiting) -> None:
        """Queue a request, or raise QueueFull naming the bound it would pass."""
        p = self.policy
        if self.requests and self.cost_s + waiting.cost_s > p.max_queue_wait_s > 0:
            raise QueueFull(
                f"queue full: about {self.cost_s * 1e3:.0f} ms of compute waits and this request needs "
                f"{waiting.cost_s * 1e3:.0f} ms; the limit is {p.max_queue_wait_s * 1e3:.0f} ms"
            )
        if self.requests + 1 > p.max_queue_requests:
            raise QueueFull(f"queue full: {self.requests} requests waiting, the limit is {p.max_queue_requests}")
        if self.requests and self.tokens + waiting.tokens > p.max_queue_tokens:  # alone, any request may wait
            raise QueueFull(
                f"queue full: {self.tokens} tokens waiting and this request has {waiting.tokens}; the limit is "
                f"{p.max_queue_tokens} tokens"
            )
        key = WEIGHTS if waiting.request.weights is not None else seq_bucket(waiting.request.seq_len, p.seq_buckets)
        self._buckets.setdefault(key, deque()).append(waiting)
        self.requests += 1
        self.tokens += waiting.tokens
        self.cost_s += waiting.cost_s

    def __len__(self) -> int:
        return self.requests

    def take(self, now: float, weights: bool = True) -> list[Waiting] | None:
        """The next ready batch (oldest first), removed from the queue; None if no bucket is ready. weights=False
        leaves weights requests waiting (one runs already: a second would only hold an engine thread idle until
        the first is done, an engine thread that shorter requests could use)."""
        ready = [
            (queue[0].enqueued, key)
            for key, queue in self._buckets.items()
            if queue and (weights or key != WEIGHTS) and self._ready(key, queue, now)
        ]
        if not ready:
            return None
        _, key = min(ready)
        return self._pop_batch(key)

    def next_due(self) -> float | None:
        """When the oldest waiting request's delay runs out (time.perf_counter()), or None when empty."""
        oldest = [queue[0].enqueued for queue in self._buckets.values() if queue]
        return min(oldest) + self.policy.max_queue_delay_s if oldest else None

    def drain(self) -> list[Waiting]:
        """Everything still waiting, removed (to answer it at shutdown)."""
        out = [w for queue in self._buckets.values() for w in queue]
        self._buckets.clear()
        self.requests = self.tokens = 0
        self.cost_s = 0.0
        return out

    def _ready(self, key: str, queue: deque[Waiting], now: float) -> bool:
        if key == WEIGHTS or now - queue[0].enqueued >= self.policy.max_queue_delay_s:
            return True
        rows, longest = 0, 0
        for waiting in queue:  # full: the queue holds a batch's worth of rows or tokens
            rows += waiting.rows
            longest = max(longest, waiting.request.seq_len)
            if rows >= self.policy.max_batch_size or rows * longest >= self.policy.max_batch_tokens:
                return True
        return False

    def _pop_batch(self, key: str) -> list[Waiting]:
        queue = self._buckets[key]
        first = queue.popleft()  # the oldest always goes, even when alone it passes a bound
        batch = [first]
        if queue and key != WEIGHTS:
            self._add_companions(batch, queue)
        self.requests -= len(batch)
        self.tokens -= sum(w.tokens for w in batch)
        self.cost_s = max(0.0, self.cost_s - sum(w.cost_s for w in batch)) if self.requests else 0.0
        return batch

    def _add_companions(self, batch: list[Waiting], queue: deque[Waiting]) -> None:
        """Add to batch (its oldest member alone so far) the waiting requests nearest to it in length that keep
        the batch within its rows, tokens and padding; remove them from the queue."""
        p = self.policy
        first = batch[0]
        rows, longest, real = first.rows, first.request.seq_len, first.tokens
        nearest = sorted(queue, key=lambda w: abs(w.request.seq_len - first.request.seq_len))
        for waiting in nearest:
            if rows >= p.max_batch_size:
                break
            new_rows, new_longest = rows + waiting.rows, max(longest, waiting.request.seq_len)
            computed = new_rows * new_longest
            if new_rows > p.max_batch_size or computed > p.max_batch_tokens:
                continue
            if computed - real - waiting.tokens > p.max_padding * computed:
                continue
            batch.append(waiting)
            rows, longest, real = new_rows, new_longest, real + waiting.tokens
        if len(batch) > 1:
            taken = {id(w) for w in batch}
            kept = [w for w in queue if id(w) not in taken]
            queue.clear()
            queue.extend(kept)


class RunTimes:
    """Recent compute seconds per sequence, by bucket (an exponential average): what a request of that
    bucket needs at least, to refuse a deadline that cannot be met and to tell a refused client when to retry."""

    def __init__(self, seq_buckets: Sequence[int], weight: float = 0.2) -> None:
        self.seq_buckets = tuple(seq_buckets)
        self.weight = weight
        self._per_sequence: dict[str, float] = {}

    def record(self, seq_len: int, rows: int, seconds: float) -> None:
        key = seq_bucket(seq_len, self.seq_buckets)
        sample = seconds / rows
        old = self._per_sequence.get(key)
        self._per_sequence[key] = sample if old is None else old + self.weight * (sample - old)

    def estimate(self, request: AttentionRequest) -> float:
        """Seconds of compute this request needs, by its bucket's recent runs (0 before any run)."""
        return self._per_sequence.get(seq_bucket(request.seq_len, self.seq_buckets), 0.0) * request.batch_size
