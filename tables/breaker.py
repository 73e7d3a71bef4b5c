"""The `breaker` table: each saga task's circuit breaker on the gateway and the payments it
holds.

One breaker per task (partition), under the key `gateway`: its state commits with the
decisions it made, in the task's transaction, and is restored from the changelog
(`<app_id>-breaker-changelog`) with the rest of the task, so it survives restarts and
moves with the partition on a rebalance. docs/retries.md#the-circuit-breaker says why it
is per task and not shared.

The held payments are an index in the same table, in the order they were held
(`KeyedTimers` used as a sorted set: "due" is the time the payment was held), so the
breaker releases the oldest first, a page at a time.
"""

from __future__ import annotations

from collections.abc import Callable

from paysaga.domain.breaker import Breaker, BreakerConfig, BreakerState
from paysaga.tables.timers import KeyedTimers
from paysaga.tables.transaction import TableTransaction

BREAKER = "breaker"
#: The key of the gateway's breaker (the one the saga has), and of its timer.
GATEWAY = b"gateway"
_COUNT = b"held-count"


class BreakerStore:
    """The task's breaker, kept parsed between inputs like `PaymentCache` keeps payments:
    taken from memory only when the table holds the very bytes it was stored with (an
    aborted batch, a restore, a rebalance all read the table's value). `load` hands out a
    copy, so the cached breaker always is the one its bytes say."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self._held: dict[int, tuple[bytes, Breaker, int]] = {}
        self.index = KeyedTimers("breaker-held")

    def load(self, table: TableTransaction, partition: int) -> tuple[Breaker, int]:
        """The breaker and its transition count (a new, closed one if none is stored)."""
        raw = table.get(GATEWAY)
        if raw is None:
            return Breaker(self.config), 0
        cached = self._held.get(partition)
        if cached is not None and cached[0] == raw:
            # A copy (its fields are all immutable): the caller changes it in place, and a
            # batch that fails before `store` must not leave a changed breaker cached
            # under bytes the table still holds.
            return cached[1].copy(), cached[2]
        seq, _, body = raw.partition(b"|")
        return Breaker.from_json(body, self.config), int(seq)

    def closed(self, table: TableTransaction, partition: int) -> bool:
        """Is the task's breaker closed? The check before every gateway call: no copy."""
        raw = table.get(GATEWAY)
        if raw is None:
            return True
        cached = self._held.get(partition)
        if cached is not None and cached[0] == raw:
            return cached[1].state is BreakerState.CLOSED
        return self.load(table, partition)[0].state is BreakerState.CLOSED

    def store(self, table: TableTransaction, partition: int, breaker: Breaker, seq: int) -> None:
        raw = b"%d|%s" % (seq, breaker.to_json())
        table.set(GATEWAY, raw)
        self._held[partition] = (raw, breaker.copy(), seq)  # the caller's stays its own

    # ---- held payments ------------------------------------------------------------------
    def hold(self, table: TableTransaction, key: bytes, at: int) -> None:
        """Add a payment to the held set (a payment already in it keeps its place)."""
        if self.index.due_of(table, key) is None:
            self.index.set(table, key, at)
            table.set(_COUNT, b"%d" % (self.held(table) + 1))

    def release(self, table: TableTransaction, key: bytes) -> None:
        if self.index.due_of(table, key) is not None:
            self.index.cancel(table, key)
            table.set(_COUNT, b"%d" % (self.held(table) - 1))

    @staticmethod
    def held(table: TableTransaction) -> int:
        """How many payments are held (a counter kept with the index, not a scan)."""
        raw = table.get(_COUNT)
        return 0 if raw is None else int(raw)

    def oldest(self, table: TableTransaction, limit: int) -> list[bytes]:
        """The payments held longest, at most `limit` of them."""
        return [key for _, key in self.index.due(table, 10**15 - 1, limit)]


def describe(get: Callable[[bytes], bytes | None], config: BreakerConfig) -> dict[str, object]:
    """A task's breaker as the worker's readiness details show it, from its committed store:
    state, failure rate, calls, when it opened, free trial permits, transitions so far and
    the payments it holds."""
    raw = get(GATEWAY)
    if raw is None:
        breaker, seq = Breaker(config), 0
    else:
        seq_raw, _, body = raw.partition(b"|")
        breaker, seq = Breaker.from_json(body, config), int(seq_raw)
    count = get(_COUNT)
    return {**breaker.snapshot(), "transitions": seq, "held": 0 if count is None else int(count)}
