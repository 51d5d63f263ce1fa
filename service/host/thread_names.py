"""Name OS threads (what `top -H`, py-spy and /proc/PID/task/*/comm show), so an operator, or a benchmark counting
CPU per thread, tells the event loop from the engine threads and onnxruntime's pools. A thread created later
inherits its creator's name, which is how onnxruntime's pool threads get theirs."""

from __future__ import annotations

import contextlib

LOOP = "attn-loop"  # the event loop: gRPC's Python side, decoding, answers, small runs computed inline
ENGINE = "attn-engine"  # the batcher's engine threads
ONNXRUNTIME = "attn-onnxrt"  # onnxruntime's intra-op pool threads (named by the thread that made the sessions)
MAX_CHARS = 15  # Linux's limit


def name_this_thread(name: str) -> None:
    """Set the calling thread's OS name (Linux); elsewhere, or where /proc is read-only, nothing happens."""
    with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as comm:
        comm.write(name[:MAX_CHARS])
