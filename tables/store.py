"""Local state: one RocksDB database per (table, partition), with bounded memory.

Layering follows Kafka Streams and Quix Streams: a `StoreManager` (process-wide memory
budget) opens `PartitionStore`s; writes reach a store only as whole committed batches,
together with the changelog offset they reflect (see `tables.transaction`). The write-ahead
log is off: the Kafka changelog is the durability, and a store that lost its last writes in
a crash is behind its recorded offset by exactly those writes, which recovery replays.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import rocksdict

#: Reserved key prefix for store metadata; user keys may not start with NUL.
META_PREFIX = b"\x00__paysaga__"
OFFSET_KEY = META_PREFIX + b"changelog_offset"


class StoreKeyError(ValueError):
    """A key in the reserved namespace."""


class StoreError(Exception):
    """The local database failed (I/O error, closed, corrupt): not the record's fault.

    Kept apart from errors an agent raises about a record, so the engine rebuilds the task
    from its changelog instead of sending a good record to the dead-letter queue.
    """


@dataclass(frozen=True)
class StoreOptions:
    """Memory bounds shared by every partition database of one process."""

    block_cache_bytes: int = 64 * 1024 * 1024
    memtable_bytes: int = 64 * 1024 * 1024
    write_buffer_bytes: int = 8 * 1024 * 1024
    max_open_files: int = 256


class StoreManager:
    """Opens partition stores under one shared block cache and memtable budget.

    Faust's default gives every partition database its own 2 GiB block cache; here the
    whole process shares `block_cache_bytes`, and the memtables of all databases are
    capped together by a write buffer manager, so RSS is bounded whatever the key count.
    """

    def __init__(self, root: Path, options: StoreOptions | None = None) -> None:
        self.root = Path(root)
        self.options = options or StoreOptions()
        self._cache = rocksdict.Cache(self.options.block_cache_bytes)
        self._wbm = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            self.options.memtable_bytes, False, self._cache
        )

    def _db_options(self) -> rocksdict.Options:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_open_files(self.options.max_open_files)
        opts.set_write_buffer_size(self.options.write_buffer_bytes)
        opts.set_max_write_buffer_number(2)
        opts.set_write_buffer_manager(self._wbm)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(self._cache)
        table.set_bloom_filter(10, False)
        table.set_cache_index_and_filter_blocks(True)
        opts.set_block_based_table_factory(table)
        return opts

    def path(self, table: str, partition: int) -> Path:
        return self.root / table / str(partition)

    def open(self, table: str, partition: int) -> PartitionStore:
        path = self.path(table, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        return PartitionStore(path, rocksdict.Rdict(str(path), self._db_options()))

    def wipe(self, table: str, partition: int) -> None:
        """Delete a partition's local state (it is rebuilt from the changelog)."""
        shutil.rmtree(self.path(table, partition), ignore_errors=True)


class PartitionStore:
    """One table partition in RocksDB and the changelog offset its contents reflect."""

    def __init__(self, path: Path, db: rocksdict.Rdict) -> None:
        self.path = path
        self._db = db
        self._write_opts = rocksdict.WriteOptions()
        # A property at run time; rocksdict's stub declares it a method (calling it fails).
        self._write_opts.disable_wal = True  # type: ignore[method-assign, assignment]

    def _failed(self, exc: Exception) -> StoreError:
        return StoreError(f"{self.path}: {exc}")

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._db.get(key)
        except Exception as exc:
            raise self._failed(exc) from exc

    def changelog_offset(self) -> int | None:
        """Offset of the last changelog record applied here, or None for a new store."""
        raw = self.get(OFFSET_KEY)
        return None if raw is None else int(raw)

    def apply(self, changes: dict[bytes, bytes | None], changelog_offset: int) -> None:
        """Write a committed batch and its changelog offset atomically."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(OFFSET_KEY, str(changelog_offset).encode())
        try:
            self._db.write(batch, self._write_opts)
        except Exception as exc:
            raise self._failed(exc) from exc

    def range(self, lo: bytes, hi: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` committed entries with lo <= key < hi, in key order."""
        out: list[tuple[bytes, bytes]] = []
        try:
            it = self._db.iter()
            it.seek(lo)
            while it.valid() and len(out) < limit:
                key = it.key()
                if key >= hi:
                    break
                out.append((key, it.value()))
                it.next()
        except Exception as exc:
            raise self._failed(exc) from exc
        return out

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every user key and value (for tests, dumps and comparisons; not the hot path)."""
        # raw_mode: every key is bytes (the stub types keys of any mode).
        return [
            (k, v)
            for k, v in self._db.items()
            if isinstance(k, bytes) and not k.startswith(META_PREFIX)
        ]

    def close(self) -> None:
        """Close the database; closing a closed (or failed) one is not an error."""
        with contextlib.suppress(rocksdict.DbClosedError):
            self._db.close()


def check_key(key: bytes) -> bytes:
    if key.startswith(META_PREFIX[:1]):
        raise StoreKeyError("table keys may not start with a NUL byte (reserved)")
    return key
