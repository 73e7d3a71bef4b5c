"""The settlement agent: a merchant's completed payments, batched and submitted together.

Thin glue between the engine and `paysaga.domain.settlement` (docs/settlement.md). The saga
hands each completed payment's SETTLE command to `paysaga.settlement.requests`, keyed by
merchant, in the transaction that completes the saga. Here it joins the batch of its
(merchant, currency, day) in the `settlement` table. A stream-time timer per batch submits
it: one `SettlementBatch` record with its members and totals, then each member's SETTLE to
the gateway, and the merchant's settlement lag, all in one transaction. The saga awaits the
gateway's `PaymentSettled` and retries an unanswered SETTLE with the same idempotency key.
A second timer purges a submitted batch's entries after the retention.
"""

from __future__ import annotations

from typing import Any

from aiokafka.structs import ConsumerRecord

from paysaga.agents.metrics import COMMANDS_SENT
from paysaga.domain.settlement import LagStats, Member, SettlementPolicy, batch_id
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import BadRecord, ProcessorContext, PunctuationType, Topology
from paysaga.tables.keyspace import KeyPartError, parse_scope_id, scope_id
from paysaga.tables.settlement import SETTLEMENT, BatchEntry, SettlementBook

SUBMIT = "settlement-submit"
PURGE = "settlement-purge"
BATCH = "SettlementBatch"
COMMAND = "PaymentCommand"


class SettlementAgent:
    """Settlement batches over the saga's SETTLE requests."""

    def __init__(self, codec: AvroCodec, topics: Topics,
                 policy: SettlementPolicy | None = None) -> None:  # fmt: skip
        self.codec = codec
        self.topics = topics
        self.policy = policy or SettlementPolicy()

    def add_to(self, topology: Topology) -> None:
        agent = topology.agent(
            "paysaga.settlement",
            sources=[self.topics.settlement_requests],
            tables=[SETTLEMENT],
            decode=self.decode,
            event_time=lambda v: v["occurred_at"],
        )
        settlement = agent(self.process)
        settlement.timer(SUBMIT, SETTLEMENT, PunctuationType.STREAM_TIME)(self._submit)
        settlement.timer(PURGE, SETTLEMENT, PunctuationType.STREAM_TIME)(self._purge)

    def decode(self, record: ConsumerRecord) -> dict[str, Any]:
        """The SETTLE command the saga wrote. Only paysaga writes this internal topic, so
        anything else is a bug upstream of here, and goes to the DLQ with its reason."""
        if record.value is None:
            raise BadRecord("decode", "empty record value (tombstone) on the settlement requests")
        try:
            fields = self.codec.decode(record.value, COMMAND)
        except DecodeError as exc:
            raise BadRecord("decode", f"{exc.reason}: {exc}") from exc
        if fields.get("command_type") != "SETTLE":
            raise BadRecord("validation", f"a {fields.get('command_type')} command is not a "
                                          "settlement request")  # fmt: skip
        if fields.get("amount_minor", 0) <= 0:
            raise BadRecord("validation", "a settlement of a non-positive amount")
        return fields

    def process(self, ctx: ProcessorContext, command: dict[str, Any]) -> None:
        merchant, pid = command["merchant_id"], command["payment_id"]
        book = SettlementBook(ctx.table(SETTLEMENT))
        try:
            if book.batch_of(merchant, pid) is not None:
                return  # this payment is in a batch already: it settles once
            # Never a submitted batch: one is submitted once stream time reaches its due
            # time, and `assign` puts a request past it into the batch open then.
            start = self.policy.assign(command["occurred_at"], ctx.stream_time)
            bid = scope_id(merchant, command["currency"], start)
            summary = book.summary(bid)
        except KeyPartError as exc:
            ctx.dead_letter("validation", str(exc))
            return
        member = Member(payment_id=pid, amount_minor=command["amount_minor"],
                        ready_at=command["occurred_at"])  # fmt: skip
        book.add(bid, merchant, start, BatchEntry(member=member, command=command))
        if summary.member_count == 0:
            ctx.timers(SUBMIT).set(bid, self.policy.due_at(start))
        summary.member_count += 1
        summary.total_minor += member.amount_minor
        book.put_summary(bid, summary)

    def _submit(self, ctx: ProcessorContext, bid: bytes, due: int) -> None:
        """The batch's cut-off passed by stream time: submit it, exactly once (the timer,
        the records and the summary's `submitted` commit in one transaction)."""
        merchant, currency, start = parse_scope_id(bid)
        book = SettlementBook(ctx.table(SETTLEMENT))
        summary = book.summary(bid)
        if summary.submitted or summary.member_count == 0:
            return
        entries = list(book.entries(bid))
        waits = LagStats()
        for e in entries:
            waits.add(due - e.member.ready_at)
        total = sum(e.member.amount_minor for e in entries)
        if total != summary.total_minor or len(entries) != summary.member_count:
            raise RuntimeError(  # the table disagrees with itself: stop, do not submit
                f"settlement batch {merchant}/{currency}/{start}: members sum to {total} "
                f"over {len(entries)}, the summary says {summary.total_minor} over "
                f"{summary.member_count}"
            )
        key = merchant.encode()
        record = {
            "batch_id": batch_id(merchant, currency, start), "merchant_id": merchant,
            "currency": currency, "batch_start": start,
            "batch_end": start + self.policy.batch_ms, "submitted_at": due,
            "member_count": len(entries), "total_minor": total,
            "members": [e.member.model_dump() for e in entries],
            "lag_max_ms": waits.max_ms, "lag_total_ms": waits.total_ms,
        }  # fmt: skip
        ctx.emit(self.topics.settlement_batches, BATCH, record, key=key, timestamp=due)
        for e in entries:
            ctx.emit(self.topics.commands, COMMAND, e.command,
                     key=e.member.payment_id.encode(), timestamp=due)  # fmt: skip
        ctx.count(COMMANDS_SENT.name, "payment", "SETTLE", n=len(entries))
        summary.submitted = True
        book.put_summary(bid, summary)
        book.put_lag(merchant, book.lag(merchant).merged(waits))
        ctx.timers(PURGE).set(bid, due + self.policy.retention_ms)

    def _purge(self, ctx: ProcessorContext, bid: bytes, due: int) -> None:
        merchant, _, _ = parse_scope_id(bid)
        SettlementBook(ctx.table(SETTLEMENT)).purge(bid, merchant)
