"""The open-loop driver keeps its rate and bounds; the soak runs end to end (briefly)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.load import soak
from tests.load.loadgen import CLIENT_OVERLOADED, LoadConfig, LoadResult, run_load
from tests.load.workload import Shape, kserve_target
from tests.server_process import ServerProcess

pytestmark = pytest.mark.load


def _drive(address: str, rate: float, poisson: bool, seconds: float, max_in_flight: int = 1024) -> LoadResult:
    config = LoadConfig(
        rate_rps=rate, poisson=poisson, duration_s=seconds, max_requests=10_000, warmup_requests=0, timeout_s=30.0,
        max_in_flight=max_in_flight,
    )  # fmt: skip
    return run_load(address, kserve_target(Shape(1, 16, 512)), config)


@pytest.mark.parametrize("poisson", [False, True], ids=["constant", "poisson"])
def test_open_loop_sends_at_its_rate(server: ServerProcess, poisson: bool) -> None:
    result = _drive(server.address, 40.0, poisson, 2.0)
    assert not result.errors, result.errors
    assert result.sent == result.count and result.checked == 1
    assert 50 <= result.count <= 110  # 80 expected; Poisson arrivals wander


def test_open_loop_is_bounded_in_flight(server: ServerProcess) -> None:
    result = _drive(server.address, 2000.0, False, 0.5, max_in_flight=4)
    assert result.errors.get(CLIENT_OVERLOADED, 0) > 0 and result.count > 0
    assert set(result.errors) == {CLIENT_OVERLOADED}


def test_soak_end_to_end_briefly(served_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model-dir", str(served_model), "--minutes", "0.1", "--warmup-s", "2", "--sample-s", "1"]
    assert soak.main([*args, "--shape", "1,16,512"]) == 0, capsys.readouterr().out
    line = capsys.readouterr().out.strip()
    assert line.startswith("soak PASS:") and "0 errors" in line
