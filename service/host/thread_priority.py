"""Lower the CPU priority (nice) of compute threads, so the event loop and gRPC's threads come first.

Under overload on few cores, compute threads at equal priority starve the loop that reads requests and sends
refusals: a request then waits before our handler sees it, where no queue bound can shed it (measured in
bench/batching_bench.py's overload section). Linux keeps nice per thread, and a new thread inherits its
creator's, so onnxruntime's intra-op threads get it when their session is created on a lowered thread."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from service.host.thread_names import ENGINE, ONNXRUNTIME, name_this_thread

log = logging.getLogger(__name__)
T = TypeVar("T")


def start_engine_thread(nice: int) -> None:
    """What an engine thread does first: take its name and its lower priority."""
    name_this_thread(ENGINE)
    lower_this_thread(nice)


def lower_this_thread(nice: int) -> None:
    """Raise the calling thread's nice by `nice` (0: leave it). Where the OS refuses, log and go on."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (OSError, AttributeError) as e:  # not Linux, or not allowed: compute just keeps equal priority
        log.warning("could not lower the compute threads' priority by %d: %s", nice, e)


def call_on_lowered_thread(fn: Callable[[], T], nice: int, name: str = ONNXRUNTIME) -> T:
    """fn() on a fresh thread lowered by `nice` and called `name`: the threads fn creates (onnxruntime's pools)
    inherit both."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        name_this_thread(name)
        lower_this_thread(nice)
        try:
            result.append(fn())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, name="lowered-init")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
