"""The reconciliation agent: captures against bank lines, per merchant and currency window.

Thin glue between the engine and `paysaga.domain.reconciliation` (docs/reconciliation.md):
a capture, a refund or a bank line is decoded and validated (bad input: the DLQ), re-keyed
by merchant when it arrived elsewhere (one hop, `paysaga.recon.repartition`), recorded in
the `recon` table, matched by reference at once, and accounted in its window. A stream-time
timer per window closes it: tier 2 over what is left, one report and one record per
problem, in the transaction of the batch whose stream time reached the close. What arrives
for a closed window is an adjustment: a new revision of its report with what it resolved
and found. A second timer forgets a closed window after `recon_retention_ms`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ValidationError

from paysaga.agents.metrics import RECON_DISCREPANCIES
from paysaga.agents.rekey import forward, source_of
from paysaga.domain.reconciliation import (
    Candidate,
    Category,
    Discrepancy,
    Line,
    Movement,
    ReconPolicy,
    discrepancy,
    match_by_amount,
    match_by_reference,
    report_id,
    utc_date,
    window_start,
)
from paysaga.schemas import events as ev
from paysaga.schemas.codec import AvroCodec, DecodeError
from paysaga.schemas.decoding import EdgeDecoder
from paysaga.schemas.models import validation_reason
from paysaga.streams.app.topics import Topics
from paysaga.streams.engine import BadRecord, ProcessorContext, PunctuationType, Topology
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.keyspace import KeyPartError, parse_scope_id, scope_id
from paysaga.tables.recon import (
    RECON,
    LineEntry,
    MovementEntry,
    ReconBook,
    WindowSummary,
)

CLOSE = "recon-close"
PURGE = "recon-purge"
REPORT = "ReconciliationReport"
DISCREPANCY = "ReconciliationDiscrepancy"
_MOVEMENT, _LINE = b"m", b"l"


def movement_of(e: ev.PaymentCaptured) -> Movement:
    return Movement(movement_id=e.capture_id, payment_id=e.payment_id,
                    reference=e.gateway_reference, amount_minor=e.amount_minor,
                    currency=e.currency, value_date=utc_date(e.occurred_at),
                    occurred_at=e.occurred_at)  # fmt: skip


def refund_of(e: ev.PaymentReversed, reference: str) -> Movement:
    """A refund: a negative movement, named by its capture's gateway reference (`reference`,
    or the payment id when its capture is not known here)."""
    return Movement(movement_id=e.reversal_id, payment_id=e.payment_id, reference=reference,
                    amount_minor=-e.amount_minor, currency=e.currency,
                    value_date=utc_date(e.occurred_at), occurred_at=e.occurred_at)  # fmt: skip


def line_of(e: ev.BankStatementLine) -> Line:
    return Line(line_key=e.line_key, reference=e.payment_reference, amount_minor=e.signed_minor,
                currency=e.currency, value_date=e.value_date,
                occurred_at=e.occurred_at)  # fmt: skip


class ReconAgent:
    """Reconciliation over the captured topic and the bank statements."""

    def __init__(self, codec: AvroCodec, topics: Topics, partitions: int,
                 policy: ReconPolicy | None = None,
                 edge: EdgeDecoder | None = None) -> None:  # fmt: skip
        self.codec = codec
        #: Shared with the saga: a capture both read is decoded and validated once.
        self.edge = edge or EdgeDecoder(codec)
        self.topics = topics
        self.partitions = partitions
        self.policy = policy or ReconPolicy()
        self.models: dict[str, tuple[str, type[BaseModel]]] = {
            topics.captured: ("PaymentCaptured", ev.PaymentCaptured),
            topics.reversed: ("PaymentReversed", ev.PaymentReversed),
            topics.bank_statements: ("BankStatementLine", ev.BankStatementLine),
        }

    def add_to(self, topology: Topology) -> None:
        agent = topology.agent(
            "paysaga.recon",
            sources=[*self.models, self.topics.recon_repartition],
            tables=[RECON],
            decode=self.decode,
            event_time=lambda v: v[1].occurred_at,
        )
        recon = agent(self.process)
        recon.timer(CLOSE, RECON, PunctuationType.STREAM_TIME)(self._close)
        recon.timer(PURGE, RECON, PunctuationType.STREAM_TIME)(self._purge)

    # ---- per record ---------------------------------------------------------------------
    def decode(self, record: ConsumerRecord) -> tuple[str, Any]:
        source = source_of(record, self.topics.recon_repartition)
        spec = self.models.get(source)
        if spec is None:
            raise BadRecord("decode", f"unknown reconciliation source topic {source!r}")
        if record.value is None:
            raise BadRecord("decode", f"empty record value (tombstone) on {source}")
        try:
            event = self.edge.decode(record.value, spec[0], spec[1])
        except DecodeError as exc:
            raise BadRecord("decode", f"{exc.reason}: {exc}") from exc
        except ValidationError as exc:
            raise BadRecord("validation", validation_reason(exc)) from exc
        return source, event

    def process(self, ctx: ProcessorContext, value: tuple[str, Any]) -> None:
        source, event = value
        if source == self.topics.reversed:
            if event.kind is not ev.ReversalKind.REFUND:
                return  # a void moves no money: nothing to reconcile
            if event.merchant_id is None:
                ctx.dead_letter("validation", "a refund without merchant_id cannot be "
                                "reconciled: its merchant's window is unknown")  # fmt: skip
                return
        key = event.merchant_id.encode()
        if partition_for(key, self.partitions) != ctx.partition:
            forward(ctx, self.topics.recon_repartition, key, source)
            return
        if self.policy.expired(event.occurred_at, ctx.stream_time):
            ctx.dead_letter("validation", "arrived after its reconciliation window's "
                            "retention (recon_retention_ms): nothing left to adjust")  # fmt: skip
            return
        book = ReconBook(ctx.table(RECON))
        try:
            if source == self.topics.captured:
                self._movement(ctx, book, event.merchant_id, movement_of(event))
            elif source == self.topics.reversed:
                ref = self._capture_reference(book, event.merchant_id, event.payment_id)
                self._movement(ctx, book, event.merchant_id, refund_of(event, ref))
            else:
                self._line(ctx, book, event.merchant_id, line_of(event))
        except KeyPartError as exc:
            ctx.dead_letter("validation", str(exc))

    @staticmethod
    def _capture_reference(book: ReconBook, merchant: str, payment_id: str) -> str:
        """The gateway reference of the payment's capture, so a bank line naming it finds
        the refund too; the payment id when no capture of it is known here."""
        for mid in book.named(merchant, payment_id):
            e = book.movement(merchant, mid)
            if e is not None and e.movement.amount_minor > 0:
                return e.movement.reference
        return payment_id

    def _window(self, merchant: str, currency: str, ts: int) -> tuple[bytes, int]:
        start = window_start(ts, self.policy.window_ms)
        return scope_id(merchant, currency, start), start

    def _movement(self, ctx: ProcessorContext, book: ReconBook, merchant: str,
                  m: Movement) -> None:  # fmt: skip
        if book.movement(merchant, m.movement_id) is not None:
            return  # the same capture again (a re-answered command): one money movement
        wid, start = self._window(merchant, m.currency, m.occurred_at)
        s = book.summary(wid)
        s.internal_count += 1
        s.internal_minor += m.amount_minor
        entry = MovementEntry(movement=m, merchant_id=merchant, window_start=start)
        refs = sorted({m.reference, m.payment_id})
        for ref in refs:
            book.index(merchant, ref, m.movement_id)
        late = s.closed  # an adjustment of a window already reported
        book.mark_open(wid, _MOVEMENT, m.movement_id, not late)
        if not late:
            ctx.timers(CLOSE).set(wid, self.policy.closes_at(start))
        book.put_movement(entry)
        book.put_summary(wid, s)
        # Lines that named this movement before it arrived (a capture takes the repartition
        # hop, a bank line may not): matched now, by the same rule, in line order.
        waiting = [le for ref in refs for k in book.waiting(merchant, ref)
                   if (le := book.line(merchant, k)) is not None and le.state is None]  # fmt: skip
        for le in sorted(waiting, key=lambda e: (e.line.occurred_at, e.line.line_key)):
            got = match_by_reference(le.line, [Candidate(entry.movement, entry.state is not None)])
            if got is not None:
                self._unwait(ctx, book, merchant, le, m.occurred_at)
                self._matched(ctx, book, merchant, le.line, entry, got.category, m.occurred_at)
        if late:
            s = book.summary(wid)
            found: list[Discrepancy] = []
            if entry.state is None:
                found.append(discrepancy(Category.MISSING_IN_BANK, merchant, m.currency, start, m))
                book.add_discrepancy(wid, found[0])
            s.revision += 1
            self._report(ctx, book, wid, s, found, [], m.occurred_at)
            book.put_summary(wid, s)

    def _line(self, ctx: ProcessorContext, book: ReconBook, merchant: str, line: Line) -> None:
        if book.line(merchant, line.line_key) is not None:
            return  # the same statement line delivered again
        entries = {}
        if line.reference is not None:
            for mid in book.named(merchant, line.reference):
                e = book.movement(merchant, mid)
                if e is not None:
                    entries[mid] = e
        got = match_by_reference(
            line, [Candidate(e.movement, e.state is not None) for e in entries.values()]
        )
        if got is None:
            self._unmatched_line(ctx, book, merchant, line)
        else:
            target = entries[got.movement.movement_id]
            self._matched(ctx, book, merchant, line, target, got.category, line.occurred_at)

    def _matched(self, ctx: ProcessorContext, book: ReconBook, merchant: str, line: Line,
                 target: MovementEntry, category: Category, at: int) -> None:  # fmt: skip
        """Account `line` in `target`'s window as tier 1 decided (`category`)."""
        m = target.movement
        wid = scope_id(merchant, m.currency, target.window_start)
        s = book.summary(wid)
        s.bank_count += 1
        s.bank_minor += line.amount_minor
        found: list[Discrepancy] = []
        resolved: list[Discrepancy] = []
        if category is not Category.DUPLICATE_IN_BANK:
            target.state, target.line_key = category, line.line_key
            book.put_movement(target)
            book.mark_open(wid, _MOVEMENT, m.movement_id, False)
            if s.closed:  # a late line for a movement the close reported missing
                missing = discrepancy(Category.MISSING_IN_BANK, merchant, m.currency,
                                      target.window_start, m)  # fmt: skip
                gone = book.drop_discrepancy(wid, missing.discrepancy_id)
                if gone is not None:
                    resolved.append(gone)
        if category is Category.MATCHED:
            s.matched_count += 1
            s.matched_minor += m.amount_minor
        else:
            d = discrepancy(category, merchant, m.currency, target.window_start, m, line)
            book.add_discrepancy(wid, d)
            found.append(d)
        book.put_line(LineEntry(line=line, merchant_id=merchant, currency=m.currency,
                                window_start=target.window_start, state=category,
                                movement_id=m.movement_id))  # fmt: skip
        book.mark_open(wid, _LINE, line.line_key, False)  # the window's, for its purge
        if not s.closed:
            found = []  # reported with the rest at the close
        self._save(ctx, book, wid, s, found, resolved, at)

    def _unmatched_line(self, ctx: ProcessorContext, book: ReconBook, merchant: str,
                        line: Line) -> None:  # fmt: skip
        wid, start = self._window(merchant, line.currency, line.occurred_at)
        s = book.summary(wid)
        s.bank_count += 1
        s.bank_minor += line.amount_minor
        book.put_line(LineEntry(line=line, merchant_id=merchant, currency=line.currency,
                                window_start=start))  # fmt: skip
        if line.reference is not None:
            book.wait(merchant, line.reference, line.line_key)
        found: list[Discrepancy] = []
        book.mark_open(wid, _LINE, line.line_key, not s.closed)
        if s.closed:
            d = discrepancy(Category.MISSING_INTERNAL, merchant, line.currency, start, line=line)
            book.add_discrepancy(wid, d)
            found.append(d)
        else:
            ctx.timers(CLOSE).set(wid, self.policy.closes_at(start))
        self._save(ctx, book, wid, s, found, [], line.occurred_at)

    def _unwait(self, ctx: ProcessorContext, book: ReconBook, merchant: str, le: LineEntry,
                at: int) -> None:  # fmt: skip
        """Take a waiting line out of the window it waited in (it moves to its movement's)."""
        line = le.line
        if line.reference is not None:
            book.unwait(merchant, line.reference, line.line_key)
        wid = scope_id(merchant, le.currency, le.window_start)
        s = book.summary(wid)
        s.bank_count -= 1
        s.bank_minor -= line.amount_minor
        resolved: list[Discrepancy] = []
        if s.closed:  # it was reported MISSING_INTERNAL there: that is resolved now
            d = discrepancy(Category.MISSING_INTERNAL, merchant, le.currency, le.window_start,
                            line=line)  # fmt: skip
            gone = book.drop_discrepancy(wid, d.discrepancy_id)
            if gone is not None:
                resolved.append(gone)
        book.leave(wid, _LINE, line.line_key)
        self._save(ctx, book, wid, s, [], resolved, at)

    def _save(self, ctx: ProcessorContext, book: ReconBook, wid: bytes, s: WindowSummary,
              found: list[Discrepancy], resolved: list[Discrepancy], at: int) -> None:  # fmt: skip
        """Store the window's summary; a closed window that changed is reported again."""
        if s.closed and (found or resolved):
            s.revision += 1
            self._report(ctx, book, wid, s, found, resolved, at)
        book.put_summary(wid, s)

    # ---- closing ------------------------------------------------------------------------
    def _close(self, ctx: ProcessorContext, wid: bytes, due: int) -> None:
        """Stream time passed the window's end plus grace: tier 2, then the first report."""
        book = ReconBook(ctx.table(RECON))
        merchant, currency, start = parse_scope_id(wid)
        s = book.summary(wid)
        if s.closed:
            return
        if s.internal_count == 0 and s.bank_count == 0:
            book.drop_summary(wid)  # everything in it moved to another window
            return
        movements = [e for i in list(book.open_ids(wid, _MOVEMENT))
                     if (e := book.movement(merchant, i)) is not None]  # fmt: skip
        lines = [le for i in list(book.open_ids(wid, _LINE))
                 if (le := book.line(merchant, i)) is not None]  # fmt: skip
        by_m = {e.movement.movement_id: e for e in movements}
        by_l = {e.line.line_key: e for e in lines}
        tier2 = match_by_amount([e.line for e in lines], [e.movement for e in movements],
                                self.policy.tolerance_days)  # fmt: skip
        for line, m in tier2.pairs:
            me, le = by_m.pop(m.movement_id), by_l.pop(line.line_key)
            me.state, me.line_key = Category.MATCHED, line.line_key
            le.state, le.movement_id = Category.MATCHED, m.movement_id
            book.put_movement(me)
            book.put_line(le)
            s.matched_count += 1
            s.matched_minor += m.amount_minor
        for line, _ in tier2.ambiguous:
            le = by_l.pop(line.line_key)
            le.state = Category.AMBIGUOUS_MATCH
            book.put_line(le)
            book.add_discrepancy(wid, discrepancy(Category.AMBIGUOUS_MATCH, merchant, currency,
                                                  start, line=line))  # fmt: skip
        for me in by_m.values():
            book.add_discrepancy(wid, discrepancy(Category.MISSING_IN_BANK, merchant, currency,
                                                  start, me.movement))  # fmt: skip
        for le in by_l.values():
            book.add_discrepancy(wid, discrepancy(Category.MISSING_INTERNAL, merchant, currency,
                                                  start, line=le.line))  # fmt: skip
        for e in movements:
            book.mark_open(wid, _MOVEMENT, e.movement.movement_id, False)
        for le in lines:
            book.mark_open(wid, _LINE, le.line.line_key, False)
        s.revision = 1
        self._report(ctx, book, wid, s, list(book.discrepancies(wid)), [], due)
        book.put_summary(wid, s)
        ctx.timers(PURGE).set(wid, self.policy.purged_at(start))

    def _purge(self, ctx: ProcessorContext, wid: bytes, due: int) -> None:
        """The closed window's retention ended by stream time: forget its entries. What
        arrives for it later is refused with that reason (`process`), never matched
        against a window that no longer exists."""
        merchant, _, _ = parse_scope_id(wid)
        ReconBook(ctx.table(RECON)).purge(wid, merchant)

    def _report(self, ctx: ProcessorContext, book: ReconBook, wid: bytes, s: WindowSummary,
                found: list[Discrepancy], resolved: list[Discrepancy],
                at: int) -> None:  # fmt: skip
        """One report revision of the window, and a record per problem found or resolved."""
        merchant, currency, start = parse_scope_id(wid)
        end = start + self.policy.window_ms
        rid = report_id(merchant, currency, start, s.revision)
        counts: Counter[str] = Counter()
        sums: Counter[str] = Counter()
        for d in book.discrepancies(wid):
            counts[d.category.value] += 1
            sums[d.category.value] += d.internal_minor if d.internal_minor is not None else (
                d.bank_minor or 0)  # fmt: skip
        key = merchant.encode()
        ctx.emit(self.topics.recon_reports, REPORT, {
            "report_id": rid, "merchant_id": merchant, "currency": currency,
            "window_start": start, "window_end": end,
            "matched_count": s.matched_count, "matched_minor": s.matched_minor,
            "unmatched_internal_count": counts[Category.MISSING_IN_BANK.value],
            "unmatched_internal_minor": sums[Category.MISSING_IN_BANK.value],
            "unmatched_bank_count": counts[Category.MISSING_INTERNAL.value],
            "unmatched_bank_minor": sums[Category.MISSING_INTERNAL.value],
            "generated_at": at, "revision": s.revision,
            "internal_count": s.internal_count, "internal_minor": s.internal_minor,
            "bank_count": s.bank_count, "bank_minor": s.bank_minor,
            "category_counts": dict(sorted(counts.items())),
            "category_sums": dict(sorted(sums.items())),
            "resolved_count": len(resolved),
        }, key=key)  # fmt: skip
        for d, status in [*((d, "OPEN") for d in sorted(found, key=_by_id)),
                          *((d, "RESOLVED") for d in sorted(resolved, key=_by_id))]:  # fmt: skip
            ctx.emit(self.topics.recon_discrepancies, DISCREPANCY, {
                "discrepancy_id": d.discrepancy_id, "report_id": rid, "merchant_id": merchant,
                "currency": currency, "kind": d.category.value, "payment_id": d.payment_id,
                "internal_minor": d.internal_minor, "bank_minor": d.bank_minor,
                "window_start": start, "window_end": end, "detected_at": at,
                "revision": s.revision, "status": status, "movement_id": d.movement_id,
                "line_key": d.line_key, "bank_currency": d.bank_currency,
            }, key=key)  # fmt: skip
            ctx.count(RECON_DISCREPANCIES.name, d.category.value, status)


def _by_id(d: Discrepancy) -> str:
    return d.discrepancy_id
