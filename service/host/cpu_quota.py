"""The CPU limit a container runtime put on this process (cgroup CPU quota), in cores.

Kubernetes' `resources.limits.cpu: 4` becomes a CFS quota, not a cpuset: the process still sees every core of the
node, and one thread per visible core on a 64-core node would be throttled to 4 cores' time slices."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>") -> cores, None when unlimited."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def parse_cfs(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us -> cores, None when unlimited (quota -1)."""
    quota = int(quota_us)
    return None if quota <= 0 else quota / int(period_us)


def cpu_limit(root: Path = CGROUP) -> float | None:
    """This cgroup's CPU limit in cores (v2, else v1); None when there is none or it cannot be read."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            return parse_cpu_max(v2.read_text())
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            return parse_cfs((v1 / "cpu.cfs_quota_us").read_text(), (v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):  # an unreadable or odd file: no limit known, as outside a container
        return None
    return None


def usable_cores() -> int:
    """CPU cores this process may run on: the cpuset, capped by the cgroup CPU quota (a pod's CPU limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cpu_limit()
    # Rounded down, as Go's automaxprocs does: a thread past the quota is throttled, a fraction left over is not.
    return cores if limit is None else max(1, min(cores, math.floor(limit)))
