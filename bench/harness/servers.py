"""Starting and stopping the servers a bench measures, each in its own process."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from bench.harness import ROOT
from bench.harness.aio_server import READY
from tests.server_process import stop_process

# The echo and baseline servers hold no work to drain: SIGTERM ends them at once, SIGKILL after this.
BENCH_SERVER_GRACE_S = 10.0

Started = TypeVar("Started")


def start_bench_server(module: str, model_dir: Path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, int]:
    """Start `python -m bench.<module> --port 0` and read its "ready <port>" line."""
    process = subprocess.Popen(
        [sys.executable, "-m", f"bench.{module}", "--port", "0", "--model-dir", str(model_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    if not found or not found[0].startswith(f"{READY} "):
        process.kill()
        raise RuntimeError(f"bench.{module} did not start (exit {process.poll()}): {found}")
    return process, int(found[0].split()[1])


def stop_bench_server(process: subprocess.Popen) -> int:
    """Stop a server start_bench_server started; its exit code."""
    return stop_process(process, grace_s=BENCH_SERVER_GRACE_S)


def start_in_parallel(
    names: Sequence[str], start: Callable[[str], Started], stop: Callable[[Started], None]
) -> dict[str, Started]:
    """start(name) for every name at once (each server starts in its own process); if one fails, the others
    are stopped and the error names every failure."""
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {name: pool.submit(start, name) for name in names}
    started, failed = {}, []
    for name, future in futures.items():
        try:
            started[name] = future.result()
        except Exception as e:
            failed.append(f"{name}: {e}")
    if failed:
        for server in started.values():
            stop(server)
        raise RuntimeError("servers failed to start:\n" + "\n".join(failed))
    return started
