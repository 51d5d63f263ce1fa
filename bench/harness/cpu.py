"""CPU time from /proc: of one process, of the whole machine, and how a run's share compares with others'."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (user + nice + system + irq + softirq + steal)."""
    try:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """How much of the machine this run used, and how much other processes took meanwhile."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start_wall = time.perf_counter()
        self.start_busy = _machine_busy_s()
        self.start_ours = sum(process_cpu_s(p) for p in pids)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start_wall
        busy = _machine_busy_s() - self.start_busy
        ours = sum(process_cpu_s(p) for p in self.pids) - self.start_ours
        cores = os.cpu_count() or 1
        return {
            "wall_s": wall,
            "cores": cores,
            "ours_cpu_fraction": ours / (wall * cores),
            "others_cpu_fraction": max(busy - ours, 0.0) / (wall * cores),
        }


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by thread name (/proc/PID/task/*/comm): the service names its
    event loop, engine threads and onnxruntime's pools (service/host/thread_names.py)."""
    out: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out
