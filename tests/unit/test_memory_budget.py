"""The memory budget: sized from the cgroup's limit (a pod's memory limit), taken per request, kept for small ones."""

from __future__ import annotations

from pathlib import Path

from service.memory_budget import MemoryBudget
from service.memory_limit import V1_UNLIMITED, cgroup_memory_limit, memory_budget, physical_memory
from service.server import gate_policy
from service.settings import Settings

MIB = 1 << 20


def test_limit_from_cgroup_v2_then_v1_and_odd_files(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(V1_UNLIMITED + 4096))
    assert cgroup_memory_limit(tmp_path) is None  # v1's "unlimited"
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2048 * MIB))
    assert cgroup_memory_limit(tmp_path) == 2048 * MIB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path) is None  # v2 wins where both exist
    (tmp_path / "memory.max").write_text(f"{4096 * MIB}\n")
    assert cgroup_memory_limit(tmp_path) == 4096 * MIB
    (tmp_path / "memory.max").write_text("garbage")
    assert cgroup_memory_limit(tmp_path) is None


def test_budget_is_the_setting_else_half_the_limit(tmp_path: Path) -> None:
    assert memory_budget(300, tmp_path) == (300 * MIB, "--memory-budget-mb")
    budget, source = memory_budget(0, tmp_path)
    assert budget == physical_memory() // 2 and "physical memory" in source
    (tmp_path / "memory.max").write_text(str(4096 * MIB))
    assert memory_budget(0, tmp_path) == (2048 * MIB, "half of the cgroup memory limit 4096 MiB")


def test_big_requests_leave_a_slice_for_small_ones() -> None:
    budget = MemoryBudget(1600 * MIB)  # 100 MiB kept for requests of at most 1.5625 MiB
    assert budget.take(1400 * MIB)
    assert not budget.take(200 * MIB)  # would fit the total, but not outside the kept slice
    assert budget.take(100 * MIB)
    assert not budget.take(101 * MIB)
    small = [budget.take(MIB) for _ in range(100)]
    assert all(small) and budget.used == 1600 * MIB
    assert not budget.take(1)  # full
    budget.give(1500 * MIB)
    assert budget.take(1400 * MIB) and budget.used == 1500 * MIB


def test_calls_at_once_fit_the_budget_at_the_largest_message() -> None:
    settings = Settings(max_message_bytes=64 * MIB, max_concurrent_rpcs=1024, max_concurrent_streams=64)
    assert gate_policy(settings, 2048 * MIB, None).max_calls == 32  # 1024 x 64 MiB would be 64 GiB
    assert gate_policy(settings, 2048 * MIB, None).max_streams == 32  # streams are calls too
    assert gate_policy(settings, 1 << 40, None).max_calls == 1024
    assert gate_policy(settings, 1, None).max_calls == 1
