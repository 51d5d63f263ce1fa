"""The bytes requests in progress may hold, taken at admission and given back with the answer.

Used from the event loop only, so a plain counter is enough. A slice of the budget is kept for small
requests: a few huge requests filling it must not refuse the many small ones behind them."""

from __future__ import annotations

SMALL_SHARE = 16  # 1/16 of the budget is kept for small requests
SMALL_PER_REQUEST = 64  # a request is small when it needs at most 1/64 of that slice


class MemoryBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._kept = total // SMALL_SHARE
        self._small = max(1, self._kept // SMALL_PER_REQUEST)

    def take(self, nbytes: int) -> bool:
        """Reserve nbytes if they fit (a big request may not use the slice kept for small ones)."""
        limit = self.total if nbytes <= self._small else self.total - self._kept
        if self.used + nbytes > limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
