"""GPU tests: fail, not skip, when ATTNSERVE_REQUIRE_GPU=1 (make gpu-check) and CUDA does not work."""

from __future__ import annotations

import pytest

from tests.gpu.cuda import cuda_problem, require_gpu


# Session scope and autouse: it runs before the session fixtures (model exports) that the tests ask for, so a
# broken CUDA setup fails every test at once instead of after minutes of setup.
@pytest.fixture(scope="session", autouse=True)
def _cuda_required() -> None:
    if require_gpu() and (problem := cuda_problem()):
        pytest.fail(f"ATTNSERVE_REQUIRE_GPU=1 but CUDA is unusable: {problem}", pytrace=False)
