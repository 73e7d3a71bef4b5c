"""The one partitioner paysaga uses: Java's default (murmur2 of the key bytes).

Upstream producers may use another one (librdkafka's default is crc32), so paysaga never
assumes where a key landed; whatever it writes or looks up by key goes through this function.
"""

from __future__ import annotations

import functools

from aiokafka.partitioner import murmur2


@functools.lru_cache(maxsize=1 << 16)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition of `key` among `partitions`, as Kafka's Java client computes it.

    Cached: aiokafka's murmur2 is pure Python (several microseconds a key), and one key is
    looked up many times in a row (a payment's inputs, its commands and status records)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
