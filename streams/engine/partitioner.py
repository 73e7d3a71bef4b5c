"""The one partitioner paysaga uses: Java's default (murmur2 of the key bytes).

Upstream producers may use another one (librdkafka's default is crc32), so paysaga never
assumes where a key landed; whatever it writes or looks up by key goes through this function.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of `key` among `partitions`, as Kafka's Java client computes it."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
