"""How much memory this process may use: the cgroup's limit (a pod's `resources.limits.memory`), else the machine's.

The service sizes its memory budget from it (service/memory_budget.py): a container killed by the OOM killer
drops every request it holds, so past the budget the server refuses new work instead."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge number (the page-aligned max of a signed 64-bit counter).
V1_UNLIMITED = 1 << 60


def cgroup_memory_limit(root: Path = CGROUP) -> int | None:
    """This cgroup's memory limit in bytes (v2 memory.max, else v1 memory.limit_in_bytes); None when unlimited
    or unreadable."""
    try:
        v2 = root / "memory.max"
        if v2.is_file():
            text = v2.read_text().strip()
            return None if text == "max" else int(text)
        v1 = root / "memory" / "memory.limit_in_bytes"
        if v1.is_file():
            limit = int(v1.read_text())
            return None if limit >= V1_UNLIMITED else limit
    except (OSError, ValueError):  # an odd file: no limit known, as outside a container
        return None
    return None


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(setting_mb: int, root: Path = CGROUP) -> tuple[int, str]:
    """(bytes, where the figure comes from): the setting when given, else half the limit, leaving the rest to
    the runtime, the model's sessions, gRPC's buffers and the allocator's high-water mark."""
    if setting_mb:
        return setting_mb << 20, "--memory-budget-mb"
    limit = cgroup_memory_limit(root)
    if limit is not None:
        return limit // 2, f"half of the cgroup memory limit {limit >> 20} MiB"
    total = physical_memory()
    return total // 2, f"half of physical memory {total >> 20} MiB (no cgroup limit)"
