"""The event loop the whole server runs on: every call's gRPC work, the HTTP port and the batcher's scheduling.

On a small request the loop's own cost is a good part of the server's: on uvloop (libuv) the lean server
(bench/lean_server.py) spent 9% less CPU per (1,16,512) request than on asyncio's selector loop, the service
2–3% (interleaved runs at concurrency 8), with the gRPC, aiohttp and asyncio code above it unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoop = Literal["uvloop", "asyncio"]


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop  # imported only when chosen: the asyncio loop needs nothing more

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """asyncio.run on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
