"""Sequence-length buckets: one set of boundaries for metric labels and load reports alike.

Attention's cost grows with the square of the sequence length, so latency is only comparable within a
range of lengths. A bucket is named by its upper bound, like a Prometheus `le`: "16" holds lengths 1..16,
"64" holds 17..64, and "+Inf" everything above the last bound. The raw length never becomes a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise

DEFAULT_SEQ_BUCKETS: tuple[int, ...] = (16, 64, 256, 1024, 4096)
OVERFLOW = "+Inf"


def parse_bounds(text: str) -> tuple[int, ...]:
    """Parse "16,64,256" into (16, 64, 256); bounds must be positive and strictly increasing."""
    try:
        bounds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"sequence buckets {text!r}: expected comma-separated integers, e.g. 16,64,256") from None
    check_bounds(bounds)
    return bounds


def check_bounds(bounds: Sequence[int]) -> None:
    if not bounds or bounds[0] < 1 or any(b <= a for a, b in pairwise(bounds)):
        raise ValueError(f"sequence buckets {list(bounds)}: need at least one, positive and strictly increasing")


def seq_bucket(seq: int, bounds: Sequence[int] = DEFAULT_SEQ_BUCKETS) -> str:
    """The bucket of a sequence length: the smallest bound ≥ seq, as text, or "+Inf"."""
    index = bisect_left(bounds, seq)
    return str(bounds[index]) if index < len(bounds) else OVERFLOW


def bucket_labels(bounds: Sequence[int] = DEFAULT_SEQ_BUCKETS) -> list[str]:
    """Every bucket name, shortest first."""
    return [str(b) for b in bounds] + [OVERFLOW]
