"""make gpu-check without a GPU: one line on stderr, nonzero, nothing installed or written; the GPU tests skip.

No test here needs a GPU: each puts a PATH without nvidia-smi (or with a fake one) in front of the script.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from tests.gpu.cuda import cuda_problem

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
NOT_FOUND = "gpu-check: no NVIDIA GPU here (nvidia-smi not found); run it on a machine with one"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bin(tmp_path: Path, smi: str | None = None) -> Path:
    """A folder for PATH holding make and python3 (links), and a fake nvidia-smi if given: nothing else."""
    folder = tmp_path / "bin"
    folder.mkdir()
    make = shutil.which("make")
    assert make is not None
    (folder / "make").symlink_to(make)
    # The interpreter itself, not a launcher (a pyenv shim needs more of PATH): the script needs only its stdlib.
    (folder / "python3").symlink_to(os.path.realpath(sys.executable))
    if smi is not None:
        (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
        (folder / "nvidia-smi").chmod(0o755)
    return folder


def _run(argv: list[str], path: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": str(path), "OUT": str(out)}
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # under make test: no flags (-j, -s), no "make[2]:" prefix
        env.pop(name, None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_script_without_nvidia_smi_says_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(["python3", str(SCRIPT)], _bin(tmp_path), out)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [NOT_FOUND]
    assert done.stdout == ""
    assert not out.exists()  # nothing written, nothing installed before the check


def test_make_gpu_check_without_nvidia_smi(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(["make", "--no-print-directory", "gpu-check"], _bin(tmp_path), out)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    # The script's one line; make adds its own "make: *** [Makefile:N: gpu-check] Error 2" after it.
    assert lines[0] == NOT_FOUND
    assert all(line.startswith("make: ***") for line in lines[1:]) and len(lines) <= 2
    assert done.stdout == ""
    assert not out.exists()


def test_nvidia_smi_without_a_gpu_says_one_line(tmp_path: Path) -> None:
    smi = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9'
    done = _run(["python3", str(SCRIPT)], _bin(tmp_path, smi), tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "gpu-check: no NVIDIA GPU here (nvidia-smi -L lists no GPU: NVIDIA-SMI has failed because it couldn't "
        "communicate with the NVIDIA driver.); run it on a machine with one"
    ]


def test_detect_gpu_reads_nvidia_smi_list(tmp_path: Path) -> None:
    folder = _bin(tmp_path, 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"')
    assert _script().detect_gpu(str(folder / "nvidia-smi")) == "GPU 0: NVIDIA H200 (UUID: GPU-0)"


def test_output_dir_prefers_flag_then_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = _script()
    monkeypatch.delenv("OUT", raising=False)
    assert script.output_dir(None) == ROOT / "reports" / "gpu"
    monkeypatch.setenv("OUT", str(tmp_path))
    assert script.output_dir(None) == tmp_path
    assert script.output_dir(tmp_path / "x") == tmp_path / "x"


def test_steps_fit_the_gpu_machines_eight_minutes() -> None:
    script = _script()
    steps = script.steps(Path("/tmp/out"))
    assert script.TOTAL_BUDGET_S <= 480
    assert sum(step.budget_s for step in steps) <= script.TOTAL_BUDGET_S
    assert all("==" in wheel for wheel in script.CUDA_WHEELS)  # pinned
    argv = {step.name: step.argv() for step in steps}
    for bench in ("bench-serve", "bench-batching"):
        assert argv[bench][argv[bench].index("--provider") + 1] == "cuda"


@pytest.mark.skipif(not cuda_problem(), reason="CUDA works here: the GPU tests run instead of skipping")
def test_gpu_tests_skip_cleanly_without_a_gpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ATTNSERVE_REQUIRE_GPU"}
    report = tmp_path / "gpu.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
         "--junitxml", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    tests, skipped = int(suite.get("tests", "0")), int(suite.get("skipped", "0"))
    assert tests >= 4 and skipped == tests, done.stdout
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
