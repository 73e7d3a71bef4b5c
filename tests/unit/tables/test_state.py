"""The state layers on real RocksDB: store, table transaction, task transaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from paysaga.tables.store import OFFSET_KEY, StoreKeyError, StoreManager
from paysaga.tables.transaction import TaskTransaction


def test_apply_is_atomic_with_its_changelog_offset(tmp_path: Path) -> None:
    manager = StoreManager(tmp_path)
    store = manager.open("payments", 0)
    assert store.changelog_offset() is None
    store.apply({b"a": b"1", b"b": b"2"}, 41)
    store.apply({b"a": None, b"c": b"3"}, 57)
    assert store.changelog_offset() == 57
    assert store.items() == [(b"b", b"2"), (b"c", b"3")]  # the offset key is not user data
    store.close()
    reopened = manager.open("payments", 0)
    assert reopened.changelog_offset() == 57 and reopened.get(b"c") == b"3"
    reopened.close()
    manager.wipe("payments", 0)
    fresh = manager.open("payments", 0)
    assert fresh.changelog_offset() is None and fresh.items() == []
    fresh.close()


def test_transaction_reads_its_own_writes_and_leaves_the_store_alone(tmp_path: Path) -> None:
    manager = StoreManager(tmp_path)
    store = manager.open("payments", 1)
    store.apply({b"k": b"old"}, 3)
    txn = TaskTransaction({"payments": store})
    table = txn.table("payments")
    assert table.get(b"k") == b"old"
    table.set(b"k", b"v1")
    table.set(b"k", b"v2")  # coalesced: one changelog record per key
    table.set(b"n", b"new")
    table.delete(b"n")
    assert table.get(b"k") == b"v2" and table.get(b"n") is None
    assert table.changes == {b"k": b"v2", b"n": None}
    assert store.get(b"k") == b"old"  # nothing reaches RocksDB before the commit
    assert [name for name, _ in txn.changed()] == ["payments"]
    store.close()


def test_reserved_keys_are_refused(tmp_path: Path) -> None:
    store = StoreManager(tmp_path).open("payments", 2)
    txn = TaskTransaction({"payments": store}).table("payments")
    with pytest.raises(StoreKeyError):
        txn.set(OFFSET_KEY, b"999")
    store.close()
