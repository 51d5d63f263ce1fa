"""The two loads bench-batching and bench-workers both measure: mixed lengths and small requests (KServe)."""

from __future__ import annotations

from tests.load.workload import LengthMix, Shape, Target, build_target

MIX = LengthMix.parse("8-512")
MIX_POOL = 256  # requests drawn from the mix, sent in turn: enough that every round sees the whole range
MIX_SEED = 0
MIX_CONCURRENCY = 16
SMALL = Shape(1, 16)
SMALL_CONCURRENCY = 8


def mixed_target() -> Target:
    """MIX_POOL KServe requests drawn from MIX (seed MIX_SEED): the same pool in every bench and run."""
    return build_target("kserve", MIX, pool=MIX_POOL, seed=MIX_SEED)
