"""The state transaction of one task's batch: buffered writes, reads of its own writes.

Nothing reaches RocksDB while a batch runs. At the batch's commit the engine produces one
changelog record per changed key (writes to the same key coalesce) inside the Kafka
transaction, and only after that transaction committed applies the changes to the store
with the changelog offset they reflect. An aborted batch simply drops its transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

from paysaga.tables.store import PartitionStore, check_key

_DELETED = None


class TableTransaction:
    """Writes to one table partition within one batch."""

    __slots__ = ("changes", "store")

    def __init__(self, store: PartitionStore) -> None:
        self.store = store
        self.changes: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        if key in self.changes:
            return self.changes[key]
        return self.store.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        self.changes[check_key(key)] = value

    def delete(self, key: bytes) -> None:
        self.changes[check_key(key)] = _DELETED

    def range(self, lo: bytes, hi: bytes, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Up to `limit` entries with lo <= key < hi as this batch sees them (its own writes
        and deletes over the committed store), in key order. For timer and expiry indexes."""
        merged: dict[bytes, bytes | None] = dict(
            self.store.range(lo, hi, limit + len(self.changes))
        )
        for key, value in self.changes.items():
            if lo <= key < hi:
                merged[key] = value
        live: list[tuple[bytes, bytes]] = sorted((k, v) for k, v in merged.items() if v is not None)
        return live[:limit]


class TaskTransaction:
    """The table transactions of one task (one partition number across all tables)."""

    def __init__(self, stores: dict[str, PartitionStore]) -> None:
        self.tables = {name: TableTransaction(store) for name, store in stores.items()}

    def table(self, name: str) -> TableTransaction:
        return self.tables[name]

    def changed(self) -> Iterator[tuple[str, TableTransaction]]:
        return ((n, t) for n, t in self.tables.items() if t.changes)
