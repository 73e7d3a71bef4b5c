"""The `payments` table: payment state by payment_id, in RocksDB with a Kafka changelog.

Values are JSON dicts of `paysaga.domain.payment.Payment` (integers only for money). The
RocksDB memory is bounded per partition database by `Settings.rocksdb_*`; Faust's default
would give every partition a 2 GiB block cache.
"""

from __future__ import annotations

from typing import Any

import faust

from paysaga.streams.settings import Settings

PAYMENTS = "payments"


def rocksdb_options(settings: Settings) -> dict[str, Any]:
    """Faust `rocksdb_options` with bounded block cache and memtables per partition DB."""
    return {
        "block_cache_size": settings.rocksdb_block_cache_bytes,
        "block_cache_compressed_size": 0,
        "write_buffer_size": settings.rocksdb_write_buffer_bytes,
        "max_write_buffer_number": 2,
        "max_open_files": 512,
    }


def payments_table(app: faust.App, settings: Settings) -> faust.Table:
    """Declare the payments table (keys: payment_id bytes; values: Payment as JSON)."""
    return app.Table(
        PAYMENTS,
        default=None,
        partitions=settings.partitions,
        key_type=bytes,  # raw bytes keys
        value_type=None,  # JSON values
        help="payment state by payment_id",
    )
