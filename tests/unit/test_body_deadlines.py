"""The call gate's body deadlines: one sweep timer ends the reads that are late, and only those."""

from __future__ import annotations

import asyncio

import pytest

from service.api.body_deadlines import SWEEP_FRACTION, BodyDeadlines, BodyLate

TIMEOUT_S = 0.2


async def _never() -> bytes:
    await asyncio.Event().wait()
    return b""


async def _soon(after_s: float) -> bytes:
    await asyncio.sleep(after_s)
    return b"body"


def test_a_late_read_ends_between_the_timeout_and_one_sweep_after() -> None:
    async def main() -> float:
        bodies = BodyDeadlines(TIMEOUT_S)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BodyLate):
            await bodies.read(_never())
        return loop.time() - started

    took = asyncio.run(main())
    assert TIMEOUT_S <= took <= TIMEOUT_S * (1 + SWEEP_FRACTION) + 0.1, took


def test_reads_in_time_answer_and_the_sweep_stops_when_none_wait() -> None:
    async def main() -> None:
        bodies = BodyDeadlines(TIMEOUT_S)
        late = asyncio.create_task(bodies.read(_never()))
        answers = await asyncio.gather(*(bodies.read(_soon(0.01 * i)) for i in range(20)))
        assert answers == [b"body"] * 20
        with pytest.raises(BodyLate):
            await late
        assert not bodies._due and not bodies._ended
        await asyncio.sleep(TIMEOUT_S)
        assert bodies._sweep is None, "a sweep was armed with nothing to read"
        assert await bodies.read(_soon(0.0)) == b"body"  # and arms again

    asyncio.run(main())


def test_a_cancellation_from_elsewhere_is_not_taken_for_a_late_body() -> None:
    async def main() -> None:
        bodies = BodyDeadlines(10.0)
        task = asyncio.create_task(bodies.read(_never()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not bodies._due and not bodies._ended

    asyncio.run(main())
