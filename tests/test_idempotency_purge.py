"""The idempotency purge timer over a real RocksDB store: expired keys leave the table."""

from __future__ import annotations

import json
from pathlib import Path

from paysaga.agents.intake import EXPIRY, purge_expired_keys
from paysaga.domain.idempotency import KeyRecord
from paysaga.streams.engine.core import Context
from paysaga.tables.idempotency import IDEMPOTENCY
from paysaga.tables.store import StoreManager
from paysaga.tables.timers import STREAM_TIME_KEY
from paysaga.tables.transaction import TaskTransaction


def test_purge_removes_expired_keys_only(tmp_path: Path) -> None:
    stores = StoreManager(tmp_path)
    store = stores.open(IDEMPOTENCY, 0)
    try:
        txn = TaskTransaction({IDEMPOTENCY: store})
        table = txn.table(IDEMPOTENCY)
        for scope, expires in ((b"old", 1_000), (b"due", 2_000), (b"young", 9_000)):
            table.set(scope, json.dumps(KeyRecord("f", "p", "e", expires).to_json()).encode())
            EXPIRY.move(table, scope, None, expires)
        table.set(STREAM_TIME_KEY, b"2000")
        store.apply(table.changes, 0)  # committed: the purge reads the store, not the batch

        txn = TaskTransaction({IDEMPOTENCY: store})
        purge_expired_keys(Context(txn, []), 0)
        table = txn.table(IDEMPOTENCY)
        assert table.get(b"old") is None and table.get(b"due") is None
        assert table.get(b"young") is not None
        assert [k for _, k in EXPIRY.due(table, 10_000)] == [b"young"]
    finally:
        store.close()
