"""`make gpu-check`: on a machine with an NVIDIA GPU, set up CUDA for onnxruntime-gpu and run every GPU check.

Steps, each under its own time budget (seconds), the whole under TOTAL_BUDGET_S (8 minutes on the GPU machine):
detect the GPU; `make venv`; install the CUDA 13 and cuDNN 9 runtime wheels onnxruntime-gpu 1.31 loads (pinned,
CUDA_WHEELS) into the venv; record versions; `make export`; a CUDA smoke session; `pytest -m gpu` with
ATTNSERVE_REQUIRE_GPU=1 (fail, not skip); `make bench-model-gpu`; a quick bench-serve and bench-batching with
the service on --provider cuda. Everything lands in one folder: --out, else $OUT, else reports/gpu/.

Without a GPU: one line on stderr and exit 2, before anything is installed or written. Standard library only:
it runs on the system python3, before the venv exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
MODEL_DIR = Path(os.environ.get("MODEL_DIR", "models/attention"))
TOTAL_BUDGET_S = 470.0  # under the GPU machine's 8 minutes, with room to copy the folder back
NO_GPU_EXIT = 2

# onnxruntime-gpu 1.31.1 is built for CUDA 13.0 (capi/build_and_package_info.py: cuda_version = '13.0');
# libonnxruntime_providers_cuda.so needs libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10 and dlopens
# cuDNN 9, cuFFT 12 and NVRTC 13. From CUDA 13 on, NVIDIA's toolkit wheels drop the -cuNN suffix and share
# site-packages/nvidia/cu13/lib; cuDNN keeps nvidia-cudnn-cu13 and nvidia/cudnn/lib. Pinned to the CUDA 13.0
# update 2 components (what ORT was built against: they need only a CUDA 13.0 driver, r580+) and a cuDNN 9
# for CUDA 13; cuFFT 12 needs nvJitLink 13.
CUDA_WHEELS = (
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cublas==13.1.0.3",
    "nvidia-curand==10.4.0.35",
    "nvidia-cufft==12.0.0.61",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-nvjitlink==13.0.88",
    "nvidia-cudnn-cu13==9.14.0.64",
)
CUDA_LIB_DIRS = (("nvidia", "cu13", "lib"), ("nvidia", "cudnn", "lib"))

SMOKE = """
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info
from model.fused_graphs import build_mha_graph
from model.weights import seeded_weights
import numpy as np
print("onnxruntime", ort.__version__, "built for CUDA", build_and_package_info.cuda_version)
print("providers offered:", ort.get_available_providers())
s = ort.InferenceSession(build_mha_graph(seeded_weights(8), 2, False, False).SerializeToString(),
                         providers=["CUDAExecutionProvider"])
print("session providers:", s.get_providers())
assert s.get_providers()[0] == "CUDAExecutionProvider", "the CUDA session fell back to CPU"
s.run(None, {"hidden_states": np.zeros((1, 16, 8), np.float32)})
print("CUDA smoke run: ok")
"""


class NoGpu(Exception):
    """No usable NVIDIA GPU here: the message is the whole report."""


def detect_gpu(smi: str | None = None) -> str:
    """`nvidia-smi -L` (one line per GPU); raises NoGpu with the reason when there is none."""
    smi = smi or shutil.which("nvidia-smi")
    if smi is None:
        raise NoGpu("nvidia-smi not found")
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NoGpu(f"nvidia-smi -L failed: {e}") from e
    gpus = [line for line in done.stdout.splitlines() if line.startswith("GPU ")]
    if done.returncode != 0 or not gpus:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[0]
        raise NoGpu(f"nvidia-smi -L lists no GPU: {said}")
    return "\n".join(gpus)


def output_dir(arg: Path | None) -> Path:
    """--out, else $OUT (the device tool copies it back), else reports/gpu/."""
    if arg is not None:
        return arg
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "reports" / "gpu"


@dataclass
class Step:
    name: str
    budget_s: float
    argv: Callable[[], list[str]]  # built when the step runs: paths may exist only then
    required: bool = True  # a failed required step stops the check; benches run on regardless
    status: str = "not run"
    seconds: float = 0.0


@dataclass
class Run:
    out: Path
    env: dict[str, str]
    deadline: float
    steps: list[Step] = field(default_factory=list)

    def run(self, step: Step) -> bool:
        # Never past the whole budget: a step gets what its budget and the time left both allow.
        limit = min(step.budget_s, self.deadline - time.monotonic())
        log = self.out / "logs" / f"{step.name}.log"
        if limit <= 1:
            step.status = "skipped: out of time"
            print(f"gpu-check: {step.name}: {step.status}", flush=True)
            return False
        argv = step.argv()
        print(f"gpu-check: {step.name} (budget {step.budget_s:.0f} s): {' '.join(argv)}", flush=True)
        started = time.monotonic()
        with open(log, "w") as sink:
            sink.write(f"$ {' '.join(argv)}\n")
            sink.flush()
            # Its own process group: on time-out the servers a bench or test started go too, not just make.
            process = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = process.wait(limit)
                step.status = "ok" if code == 0 else f"FAILED (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                step.status = f"FAILED (over its {limit:.0f} s)"
        step.seconds = time.monotonic() - started
        print(f"gpu-check: {step.name}: {step.status} in {step.seconds:.0f} s (log {log})", flush=True)
        return step.status == "ok"


def site_packages() -> Path:
    done = subprocess.run(
        [str(VENV_PY), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(done.stdout.strip())


def cuda_env(env: dict[str, str]) -> dict[str, str]:
    """LD_LIBRARY_PATH with the wheels' lib folders first: every child (pytest, the services the benches start)
    inherits it, which onnxruntime.preload_dlls, in one process only, would not give them."""
    site = site_packages()
    dirs = [str(site.joinpath(*parts)) for parts in CUDA_LIB_DIRS]
    return {**env, "LD_LIBRARY_PATH": os.pathsep.join([*dirs, *filter(None, [env.get("LD_LIBRARY_PATH")])])}


def steps(out: Path) -> list[Step]:
    py = str(VENV_PY)
    model = str(MODEL_DIR)
    shell = ["bash", "-c"]
    versions = (
        "set -x; nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv; "
        f"{py} -c 'import onnxruntime as o; o.print_debug_info()'; {py} -m pip list 2>/dev/null | grep -i "
        "-e nvidia -e onnxruntime -e torch; uname -a; echo LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    )
    bench_flags = ["--quick", "--provider", "cuda", "--model-dir", model]
    return [
        Step("venv", 110, lambda: ["make", "--no-print-directory", "venv"]),
        Step("cuda-libs", 80, lambda: [py, "-m", "pip", "install", "--quiet", "--no-input", *CUDA_WHEELS]),
        Step("versions", 15, lambda: [*shell, versions], required=False),
        Step("export", 30, lambda: ["make", "--no-print-directory", "export", f"MODEL_DIR={model}"]),
        Step("cuda-smoke", 20, lambda: [py, "-c", SMOKE]),
        Step(
            "pytest-gpu",
            70,
            lambda: [
                *[py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", "-v"],
                *["--junitxml", f"{out}/pytest-gpu.xml"],
            ],
            required=False,
        ),
        Step(
            "bench-model-gpu",
            40,
            lambda: [
                "make",
                "--no-print-directory",
                "bench-model-gpu",
                f"MODEL_DIR={model}",
                f"MODEL_BENCH_GPU_OUT={out}/model_bench_gpu.md",
            ],
            required=False,
        ),
        Step(
            "bench-serve",
            60,
            lambda: [
                py,
                "-m",
                "bench.serve_bench",
                *bench_flags,
                "--out",
                f"{out}/serve_bench.md",
                "--json",
                f"{out}/serve_bench.json",
            ],
            required=False,
        ),
        Step(
            "bench-batching",
            40,
            lambda: [py, "-m", "bench.batching_bench", *bench_flags, "--out", f"{out}/batching_bench.md"],
            required=False,
        ),
    ]


def summary(run: Run, gpus: str, wall_s: float) -> str:
    lines = [
        "# gpu-check",
        "",
        f"GPUs (`nvidia-smi -L`):\n\n```\n{gpus}\n```",
        "",
        f"CUDA wheels: {', '.join(f'`{w}`' for w in CUDA_WHEELS)}. Whole run {wall_s:.0f} s "
        f"(budget {TOTAL_BUDGET_S:.0f} s).",
        "",
        "| step | budget s | took s | result |",
        "|---|---|---|---|",
        *(f"| {s.name} | {s.budget_s:.0f} | {s.seconds:.0f} | {s.status} |" for s in run.steps),
        "",
        "Logs: logs/<step>.log; pytest's log: logs/pytest-gpu.log (JUnit XML: pytest-gpu.xml); versions, "
        "nvidia-smi and onnxruntime's debug info: logs/versions.log.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else reports/gpu/)")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        gpus = detect_gpu()
    except NoGpu as e:
        print(f"gpu-check: no NVIDIA GPU here ({e}); run it on a machine with one", file=sys.stderr)
        return NO_GPU_EXIT
    out = output_dir(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "nvidia-smi-L.txt").write_text(gpus + "\n")
    print(f"gpu-check: {gpus.splitlines()[0]} (+{len(gpus.splitlines()) - 1} more); reports -> {out}", flush=True)
    env = {**os.environ, "ATTNSERVE_REQUIRE_GPU": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = Run(out, env, started + TOTAL_BUDGET_S)
    run.steps = steps(out)
    ok = True
    for step in run.steps:
        if step.name == "versions":  # the wheels are installed now: their folders exist
            run.env = cuda_env(run.env)
        passed = run.run(step)
        ok = ok and passed
        if not passed and step.required:
            break
    (out / "summary.md").write_text(summary(run, gpus, time.monotonic() - started))
    print(f"gpu-check: {'PASS' if ok else 'FAIL'}; summary in {out / 'summary.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
