"""The way from an accepted request to the engine's thread.

Today every request is its own batch; dynamic batching by sequence-length bucket replaces the inside of
`Batcher.submit` without changing its contract: one awaited call, one answer or one typed error.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from service.engine import Engine, EngineOutput
from service.errors import DeadlineExceeded
from service.limits import check_finite
from service.types import AttentionRequest


class Batcher:
    def __init__(self, engine: Engine, workers: int = 1) -> None:
        self.engine = engine
        # onnxruntime releases the GIL while it runs, so these threads compute while the event loop serves gRPC.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")

    async def submit(self, request: AttentionRequest) -> tuple[EngineOutput, float]:
        """(engine output, seconds queued). Raises DeadlineExceeded if the deadline passes before compute."""
        enqueued = time.perf_counter()

        def job() -> tuple[EngineOutput, float]:
            queued = time.perf_counter() - enqueued
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise DeadlineExceeded(f"deadline passed after {queued * 1e3:.1f} ms in the queue, before compute")
            check_finite(request.hidden_states)
            return self.engine.run(request.hidden_states, request.mask, request.weights is not None), queued

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    def close(self) -> None:
        """Wait for the run in progress, if any; nothing new is accepted after this."""
        self._executor.shutdown(wait=True)
