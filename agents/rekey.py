"""Re-keying an input through a repartition topic, and reading it back as what it was.

An agent keyed by something its input topic is not partitioned by (the saga by payment_id,
reconciliation by merchant) forwards a record found on the wrong partition, bytes unchanged,
to its own repartition topic with the topic it was read from in a header, in the same
transaction as the read (docs/contract.md#partitioning). Reading it back, the header says
which decoder applies.
"""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from paysaga.streams.engine import ProcessorContext

#: Header on a repartition topic: the topic the record was first read from.
H_SOURCE = "paysaga.source"


def source_of(record: ConsumerRecord, repartition_topic: str) -> str:
    """The topic `record` was first read from (its own, unless it was re-keyed)."""
    if record.topic == repartition_topic:
        return dict(record.headers or ()).get(H_SOURCE, b"").decode()
    return str(record.topic)


def forward(ctx: ProcessorContext, repartition_topic: str, key: bytes, source: str) -> None:
    """Send the record being processed to `repartition_topic` under `key`, noting `source`."""
    record = ctx.record
    assert record is not None
    hdrs = [h for h in record.headers or () if h[0] != H_SOURCE]
    hdrs.append((H_SOURCE, source.encode()))
    ctx.send(repartition_topic, key, record.value, hdrs)
