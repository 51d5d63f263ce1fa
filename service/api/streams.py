"""Bidirectional streams: requests handled concurrently, answered in completion order, with backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Response = TypeVar("Response")
_END = object()


async def answer_each(
    requests: AsyncIterable[Request], answer: Callable[[Request], Awaitable[Response]], max_pending: int
) -> AsyncIterator[Response]:
    """Yield answer(r) for every r as soon as it is ready; `answer` must turn its errors into responses.

    At most max_pending answers are computing or waiting to be sent: the next request is read only when one of
    them has gone out. gRPC resumes this generator after the previous answer was handed to the transport, and
    the transport holds it while the client's flow-control window is closed, so a client that stops reading
    stops the reading of its requests, and the server holds at most max_pending answers for it."""
    done: asyncio.Queue[object] = asyncio.Queue()
    slots = asyncio.Semaphore(max_pending)
    pending: set[asyncio.Task[None]] = set()  # answered tasks leave it: a long stream holds no history

    async def run(request: Request) -> None:
        done.put_nowait(await answer(request))

    async def read() -> None:
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(run(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)  # the end of the stream waits for its last answer
        finally:
            done.put_nowait(_END)

    reader = asyncio.create_task(read())
    try:
        while (item := await done.get()) is not _END:
            yield item  # type: ignore[misc]  # items are Responses; _END, the one other object, ended the loop
            slots.release()  # resumed: that answer went out
        reader.result()  # re-raise a broken request stream
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
