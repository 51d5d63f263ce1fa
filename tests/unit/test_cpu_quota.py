"""The cgroup CPU quota caps the service's default thread counts (a pod's CPU limit, not the node's cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.host.cpu_quota import cpu_limit, parse_cfs, parse_cpu_max


@pytest.mark.parametrize(("text", "cores"), [("400000 100000\n", 4.0), ("150000 100000", 1.5), ("max 100000", None)])
def test_cgroup_v2_cpu_max(text: str, cores: float | None) -> None:
    assert parse_cpu_max(text) == cores


def test_cgroup_v1_quota() -> None:
    assert parse_cfs("200000\n", "100000\n") == 2.0
    assert parse_cfs("-1", "100000") is None


def test_cpu_limit_reads_v2_then_v1_and_tolerates_odd_files(tmp_path: Path) -> None:
    assert cpu_limit(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu.max").write_text("50000 100000")
    assert cpu_limit(tmp_path) == 0.5  # v2 wins where both exist
    (tmp_path / "cpu.max").write_text("garbage")
    assert cpu_limit(tmp_path) is None
