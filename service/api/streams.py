"""Bidirectional streams: every request handled concurrently, answered in completion order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Response = TypeVar("Response")
_END = object()


async def answer_each(
    requests: AsyncIterable[Request], answer: Callable[[Request], Awaitable[Response]]
) -> AsyncIterator[Response]:
    """Yield answer(r) for every r as soon as it is ready; `answer` must turn its errors into responses."""
    done: asyncio.Queue[object] = asyncio.Queue()
    pending: set[asyncio.Task[None]] = set()  # answered tasks leave it: a long stream holds no history

    async def run(request: Request) -> None:
        done.put_nowait(await answer(request))

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(run(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)  # the end of the stream waits for its last answer
        finally:
            done.put_nowait(_END)

    reader = asyncio.create_task(read())
    try:
        while (item := await done.get()) is not _END:
            yield item  # type: ignore[misc]
        reader.result()  # re-raise a broken request stream
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
