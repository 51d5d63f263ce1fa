"""Stock Triton client tools for the tests: tritonclient[grpc] 2.41.0 and the perf_analyzer it ships.

perf_analyzer is the wheel's `bin/perf_analyzer` (in the venv's bin/). It links libb64.so.0d (Debian's
libb64-0d) and libcudart.so.12 (pip's nvidia-cuda-runtime-cu12, `nvidia/cuda_runtime/lib` in
site-packages, put on LD_LIBRARY_PATH by perf_analyzer_env()); it then runs without a GPU.

Never import `tritonclient.grpc` in the pytest process: it adds its own copy of the KServe protos (package
`inference`) to protobuf's default descriptor pool, and so does service._pb, so whichever comes second
fails with "duplicate symbol 'inference.DataType'". Run the Python client in a child process instead:
run_triton_client().
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

PERF_ANALYZER = "perf_analyzer"
CUDART = "libcudart.so.12"
_CUDART_SUBDIR = Path("nvidia") / "cuda_runtime" / "lib"
_INSTALL_HINT = "make venv (pip: tritonclient[grpc]==2.41.0 nvidia-cuda-runtime-cu12; apt-get: libb64-0d)"


def _dist_file(dist: str, name: str) -> Path | None:
    """The installed file of distribution `dist` whose path ends with `name`, if any."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == name.rsplit("/", 1)[-1] and entry.as_posix().endswith(name):
            path = Path(str(entry.locate())).resolve()
            if path.exists():
                return path
    return None


def perf_analyzer_path() -> Path | None:
    """Absolute path of tritonclient's perf_analyzer, or None when tritonclient is not installed."""
    candidates = [Path(sys.prefix) / "bin" / PERF_ANALYZER, Path(sys.executable).parent / PERF_ANALYZER]
    recorded = _dist_file("tritonclient", f"bin/{PERF_ANALYZER}")
    if recorded is not None:
        candidates.insert(0, recorded)
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def cuda_runtime_lib_dir() -> Path | None:
    """The folder holding nvidia-cuda-runtime-cu12's libcudart.so.12, or None when it is not installed."""
    recorded = _dist_file("nvidia-cuda-runtime-cu12", f"{_CUDART_SUBDIR.as_posix()}/{CUDART}")
    if recorded is not None:
        return recorded.parent
    for key in ("platlib", "purelib"):
        lib = Path(sysconfig.get_paths()[key]) / _CUDART_SUBDIR
        if (lib / CUDART).exists():
            return lib
    return None


def perf_analyzer_command() -> list[str]:
    """argv[0] for perf_analyzer (an absolute path); FileNotFoundError when it is not installed."""
    path = perf_analyzer_path()
    if path is None:
        raise FileNotFoundError(f"{PERF_ANALYZER} not found under {sys.prefix}: {_INSTALL_HINT}")
    return [str(path)]


def perf_analyzer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) plus LD_LIBRARY_PATH starting with the CUDA runtime's lib folder."""
    env = dict(os.environ if base is None else base)
    lib = cuda_runtime_lib_dir()
    if lib is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != str(lib)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib), *parts])
    return env


@functools.cache
def perf_analyzer_available() -> tuple[bool, str]:
    """(True, version line) when `perf_analyzer --version` runs; else (False, why) for pytest.skip."""
    path = perf_analyzer_path()
    if path is None:
        return False, f"{PERF_ANALYZER} not installed in {sys.prefix}: {_INSTALL_HINT}"
    if cuda_runtime_lib_dir() is None:
        return False, f"{CUDART} not found (pip package nvidia-cuda-runtime-cu12): {_INSTALL_HINT}"
    try:
        done = subprocess.run(
            [str(path), "--version"], env=perf_analyzer_env(), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{path} --version failed: {exc}"
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        hint = " (apt-get install libb64-0d)" if "libb64" in out else ""
        return False, f"{path} --version exited {done.returncode}: {out[-500:]}{hint}"
    return True, out.splitlines()[-1] if out else "perf_analyzer"


def tritonclient_available() -> tuple[bool, str]:
    """Whether tritonclient with its grpc extra is installed, found without importing it here."""
    if importlib.util.find_spec("tritonclient") is None:
        return False, f"tritonclient not installed: {_INSTALL_HINT}"
    missing = [m for m in ("grpc", "rapidjson", "packaging") if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"tritonclient[grpc] dependencies missing: {', '.join(missing)}"
    return True, importlib.metadata.version("tritonclient")


def run_triton_client(
    code: str, *args: str, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run Python `code` (which may import tritonclient.grpc) in a child interpreter; args go to sys.argv[1:]."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def write_perf_analyzer_data(path: Path, seq: int, d_model: int) -> None:
    """perf_analyzer's own random data has NaN/Inf and a garbage mask: give it finite hidden_states only."""
    x = np.random.default_rng(0).standard_normal((seq, d_model), dtype=np.float32)
    path.write_text(json.dumps({"data": [{"hidden_states": {"content": x.ravel().tolist(), "shape": [seq, d_model]}}]}))


def perf_analyzer_measurement(protocol: str, url: str, work: Path) -> list[dict[str, str]]:
    """One completed perf_analyzer measurement of the served model over `protocol` (grpc | http): (1,128,512)
    batch 2 at concurrency 2, 20 requests per window; its CSV report's rows. Asserts perf_analyzer runs and exits 0."""
    available, why = perf_analyzer_available()
    assert available, f"perf_analyzer must run here (make installs libb64-0d and the CUDA runtime wheel): {why}"
    data, report = work / "hs.json", work / "pa.csv"
    write_perf_analyzer_data(data, 128, 512)
    argv = [
        *perf_analyzer_command(), "-m", "attention", "-i", protocol, "-u", url, "-b", "2",
        "--input-data", str(data), "--concurrency-range", "2",
        "--measurement-mode", "count_windows", "--measurement-request-count", "20",
        "--stability-percentage", "1000", "--max-trials", "3", "-f", str(report),
    ]  # fmt: skip
    done = subprocess.run(argv, env=perf_analyzer_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    with report.open() as rows:
        return list(csv.DictReader(rows))
