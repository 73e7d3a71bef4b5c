"""Event-time windows in a table (`tables.windows`), over real RocksDB stores."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paysaga.tables.store import PartitionStore, StoreManager, StoreOptions
from paysaga.tables.timers import KeyedTimers
from paysaga.tables.transaction import TableTransaction
from paysaga.tables.windows import MAX_TIME, Fold, Window, Windows, WindowStore

SMALL = StoreOptions(block_cache_bytes=1 << 20, memtable_bytes=1 << 20, write_buffer_bytes=1 << 18)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartitionStore]:
    db = StoreManager(tmp_path, SMALL).open("windows", 0)
    yield db
    db.close()


def add(amount: int) -> Fold:
    """A fold summing decimal amounts."""

    def fold(window: Window, current: bytes | None) -> bytes:
        return str((0 if current is None else int(current)) + amount).encode()

    return fold


def window_keys(db: PartitionStore) -> list[bytes]:
    return [k for k, _ in db.items() if k.startswith(b"\x01w/")]


# ---- window assignment ----------------------------------------------------------------------


def test_tumbling_windows_are_epoch_aligned_and_end_exclusive() -> None:
    w = Windows.tumbling(10)
    assert (w.size_ms, w.advance_ms, w.grace_ms) == (10, 10, 0)
    assert w.containing(0) == [0]
    assert w.containing(9) == [0]
    assert w.containing(10) == [10]  # end is exclusive
    assert w.containing(1_234_567) == [1_234_560]


def test_hopping_windows_contain_every_start_within_size() -> None:
    w = Windows.hopping(10, 5)
    assert w.containing(3) == [0]  # the window at -5 would contain 3, but starts are >= 0
    assert w.containing(7) == [0, 5]
    assert w.containing(10) == [5, 10]
    assert w.containing(14) == [5, 10]
    assert w.containing(15) == [10, 15]
    assert Windows.hopping(10, 3).containing(10) == [3, 6, 9]  # size not a multiple of advance


@pytest.mark.parametrize(("size", "advance"), [(1, 1), (10, 10), (10, 5), (10, 3), (7, 2), (5, 1)])
def test_containing_matches_the_definition(size: int, advance: int) -> None:
    w = Windows(size, advance)
    for ts in range(0, 60):
        expected = [s for s in range(0, ts + 1, advance) if s <= ts < s + size]
        assert w.containing(ts) == expected, ts


@pytest.mark.parametrize(
    ("size", "advance", "grace", "message"),
    [
        (0, 0, 0, "size_ms must be positive"),
        (-10, 5, 0, "size_ms must be positive"),
        (10, 0, 0, "advance_ms must be in"),
        (10, -5, 0, "advance_ms must be in"),
        (10, 11, 0, "advance_ms must be in"),
        (10, 10, -1, "grace_ms must not be negative"),
        (MAX_TIME, MAX_TIME, 1, "must not exceed"),
    ],
)
def test_invalid_declarations_are_refused(
    size: int, advance: int, grace: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Windows(size, advance, grace)


def test_other_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="grace_ms"):
        Windows.tumbling(10, grace_ms=-1)
    with pytest.raises(ValueError, match="advance_ms"):
        Windows.hopping(10, 20)
    with pytest.raises(TypeError, match="size_ms must be an int"):
        Windows(10.0, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be negative"):
        Windows.tumbling(10).containing(-1)
    for name in ("", "a/b"):
        with pytest.raises(ValueError, match="name"):
            WindowStore(name, Windows.tumbling(10))


# ---- the store --------------------------------------------------------------------------------


def test_folds_accumulate_across_committed_batches(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.hopping(10, 5))
    txn = TableTransaction(store)
    first = ws.update(txn, b"k", 7, 7, add(3))
    assert first.updated == [Window(b"k", 0, 10), Window(b"k", 5, 15)] and first.late == []
    store.apply(txn.changes, 0)

    txn = TableTransaction(store)  # a new batch reads the committed aggregates
    assert ws.get(txn, b"k", 0) == b"3" and ws.get(txn, b"k", 5) == b"3"
    ws.update(txn, b"k", 8, 8, add(4))
    assert len(txn.changes) == 2  # the two aggregates; both windows are in the index already
    ws.update(txn, b"k", 12, 12, add(10))  # windows 5 and 10
    late = ws.update(txn, b"other", 8, 12, add(100))  # window 0 closed at 10
    assert late.late == [Window(b"other", 0, 10)] and late.updated == [Window(b"other", 5, 15)]
    store.apply(txn.changes, 1)

    txn = TableTransaction(store)
    assert ws.get(txn, b"k", 0) == b"7"
    assert ws.get(txn, b"k", 5) == b"17"
    assert ws.get(txn, b"k", 10) == b"10"
    assert ws.get(txn, b"k", 15) is None
    assert ws.open_windows(txn, b"k") == [
        (Window(b"k", 0, 10), b"7"),
        (Window(b"k", 5, 15), b"17"),
        (Window(b"k", 10, 20), b"10"),
    ]
    assert ws.open_windows(txn, b"other") == [(Window(b"other", 5, 15), b"100")]


def test_a_fold_that_changes_nothing_writes_nothing(store: PartitionStore) -> None:
    ws = WindowStore("max", Windows.tumbling(10))
    txn = TableTransaction(store)
    ws.update(txn, b"k", 1, 1, add(5))
    store.apply(txn.changes, 0)
    txn = TableTransaction(store)
    update = ws.update(txn, b"k", 2, 2, lambda w, cur: cur or b"")
    assert update.updated == [] and update.late == [] and txn.changes == {}


def test_a_fold_must_return_bytes(store: PartitionStore) -> None:
    ws = WindowStore("bad", Windows.tumbling(10))
    txn = TableTransaction(store)

    def not_bytes(window: Window, current: bytes | None) -> bytes:
        return "5"  # type: ignore[return-value]

    with pytest.raises(TypeError, match="bytes"):
        ws.update(txn, b"k", 1, 1, not_bytes)
    assert txn.changes == {}


def test_close_due_returns_exactly_the_windows_past_end_plus_grace(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.tumbling(10, grace_ms=5))
    other = WindowStore("others", Windows.tumbling(10))
    timers = KeyedTimers("t")
    txn = TableTransaction(store)
    txn.set(b"user-key", b"payload")
    timers.set(txn, b"id", 0)
    for ts in (0, 9, 10, 19, 20, 35):  # windows 0 (closes 15), 10 (25), 20 (35), 30 (45)
        ws.update(txn, b"k", ts, 0, add(ts))
    other.update(txn, b"k", 3, 0, add(1))  # closes at 10, but is another store's
    store.apply(txn.changes, 0)

    txn = TableTransaction(store)
    assert ws.close_due(txn, 14) == []
    closed = ws.close_due(txn, 25)
    assert closed == [(Window(b"k", 0, 10), b"9"), (Window(b"k", 10, 20), b"29")]
    assert ws.get(txn, b"k", 0) is None and ws.get(txn, b"k", 10) is None
    assert [w.start for w, _ in ws.open_windows(txn, b"k")] == [20, 30]
    store.apply(txn.changes, 1)

    # other data of the table is untouched, and so is the other window store
    assert store.get(b"user-key") == b"payload"
    txn = TableTransaction(store)
    assert timers.due(txn, 100) == [(0, b"id")]
    assert other.open_windows(txn, b"k") == [(Window(b"k", 0, 10), b"1")]
    assert ws.close_due(txn, 44) == [(Window(b"k", 20, 30), b"20")]


def test_each_window_is_closed_once_and_a_record_for_it_is_late_after(
    store: PartitionStore,
) -> None:
    ws = WindowStore("sums", Windows.tumbling(10))
    txn = TableTransaction(store)
    ws.update(txn, b"k", 5, 5, add(1))
    store.apply(txn.changes, 0)

    txn = TableTransaction(store)
    assert ws.close_due(txn, 10) == [(Window(b"k", 0, 10), b"1")]
    assert ws.close_due(txn, 10) == []  # within the batch: deleted already
    store.apply(txn.changes, 1)
    assert window_keys(store) == [ws.prefix + b"m/closed"]

    txn = TableTransaction(store)
    assert ws.close_due(txn, 10) == [] and ws.close_due(txn, 1000) == []
    # even a caller passing an older stream time cannot re-create the closed window
    update = ws.update(txn, b"k", 6, 6, add(1))
    assert update.updated == [] and update.late == [Window(b"k", 0, 10)]
    assert ws.update(txn, b"new", 6, 6, add(1)).late == [Window(b"new", 0, 10)]
    assert ws.update(txn, b"k", 10, 10, add(1)).updated == [Window(b"k", 10, 20)]


def test_an_aborted_close_is_closed_again(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.tumbling(10))
    txn = TableTransaction(store)
    ws.update(txn, b"k", 5, 5, add(1))
    store.apply(txn.changes, 0)
    dropped = TableTransaction(store)
    assert ws.close_due(dropped, 10) == [(Window(b"k", 0, 10), b"1")]  # never applied
    txn = TableTransaction(store)
    assert ws.close_due(txn, 10) == [(Window(b"k", 0, 10), b"1")]


def test_late_exactly_at_end_plus_grace(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.hopping(10, 5, grace_ms=3))
    txn = TableTransaction(store)
    # ts 7 is in windows 0 (closes at 10 + 3 = 13) and 5 (closes at 18)
    early = ws.update(txn, b"k", 7, 12, add(1))
    assert early.updated == [Window(b"k", 0, 10), Window(b"k", 5, 15)] and early.late == []
    at = ws.update(txn, b"k", 7, 13, add(1))
    assert at.late == [Window(b"k", 0, 10)] and at.updated == [Window(b"k", 5, 15)]
    assert ws.get(txn, b"k", 0) == b"1" and ws.get(txn, b"k", 5) == b"2"
    both = ws.update(txn, b"k", 7, 18, add(1))
    assert both.late == [Window(b"k", 0, 10), Window(b"k", 5, 15)] and both.updated == []

    assert ws.close_due(txn, 12) == []
    assert ws.close_due(txn, 13) == [(Window(b"k", 0, 10), b"1")]
    assert ws.close_due(txn, 17) == []
    assert ws.close_due(txn, 18) == [(Window(b"k", 5, 15), b"2")]


def test_keys_may_hold_any_bytes(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.tumbling(10, grace_ms=10))
    keys = [
        b"a",
        b"a/",
        b"a/0",
        b"a\x00",
        b"a\x00\x00",
        b"\x00",
        b"",
        b"\x01w/sums/c/",
        b"\xff/\x01",
    ]
    txn = TableTransaction(store)
    for i, key in enumerate(keys):
        ws.update(txn, key, 15, 15, add(i + 1))
        ws.update(txn, key, 5, 15, add(100 * (i + 1)))
    store.apply(txn.changes, 0)

    txn = TableTransaction(store)
    for i, key in enumerate(keys):
        assert ws.open_windows(txn, key) == [
            (Window(key, 0, 10), str(100 * (i + 1)).encode()),
            (Window(key, 10, 20), str(i + 1).encode()),
        ]
        assert ws.get(txn, key, 10) == str(i + 1).encode()
    assert ws.close_due(txn, 19) == []
    closed = ws.close_due(txn, 30)
    # close order: by close time, then start, then key bytes
    assert [(w.start, w.key) for w, _ in closed] == [(0, k) for k in sorted(keys)] + [
        (10, k) for k in sorted(keys)
    ]
    assert {(w.key, w.start): v for w, v in closed} == {
        **{(k, 0): str(100 * (i + 1)).encode() for i, k in enumerate(keys)},
        **{(k, 10): str(i + 1).encode() for i, k in enumerate(keys)},
    }
    store.apply(txn.changes, 1)
    assert window_keys(store) == [ws.prefix + b"m/closed"]


def test_close_order_is_by_close_time_then_start_then_key(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.hopping(100, 10, grace_ms=50))
    txn = TableTransaction(store)
    # scrambled arrival: 1000 after 5, large keys before small ones, all in one batch
    for ts, key in ((1000, b"z"), (5, b"b"), (95, b"a"), (5, b"a"), (1000, b"a"), (40, b"c")):
        ws.update(txn, key, ts, 0, add(1))
    store.apply(txn.changes, 0)
    txn = TableTransaction(store)
    closed = ws.close_due(txn, MAX_TIME)
    got = [(w.end + 50, w.start, w.key) for w, _ in closed]
    assert got == sorted(got) and len(got) == len(set(got))
    assert got[:3] == [(150, 0, b"a"), (150, 0, b"b"), (150, 0, b"c")]
    assert got[-2:] == [(1150, 1000, b"a"), (1150, 1000, b"z")]


def test_close_due_pages_with_its_limit(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.tumbling(10))
    txn = TableTransaction(store)
    for start in range(0, 100, 10):
        ws.update(txn, b"k", start, 0, add(start))
    store.apply(txn.changes, 0)
    txn = TableTransaction(store)
    pages = []
    while page := ws.close_due(txn, 75, limit=3):
        pages.append([w.start for w, _ in page])
    assert pages == [[0, 10, 20], [30, 40, 50], [60]]
    assert [w.start for w, _ in ws.open_windows(txn, b"k")] == [70, 80, 90]


def test_closing_reads_the_batchs_own_writes(store: PartitionStore) -> None:
    ws = WindowStore("sums", Windows.tumbling(10))
    txn = TableTransaction(store)
    ws.update(txn, b"k", 1, 1, add(2))
    store.apply(txn.changes, 0)  # window 0 committed as 2

    txn = TableTransaction(store)  # nothing of this batch is committed
    ws.update(txn, b"k", 2, 2, add(3))  # committed window, changed in the batch
    ws.update(txn, b"j", 12, 12, add(7))  # a window created in the batch
    ws.update(txn, b"j", 25, 25, add(1))  # stays open
    assert ws.close_due(txn, 20) == [(Window(b"k", 0, 10), b"5"), (Window(b"j", 10, 20), b"7")]
    store.apply(txn.changes, 1)
    txn = TableTransaction(store)
    assert ws.close_due(txn, 30) == [(Window(b"j", 20, 30), b"1")]
    store.apply(txn.changes, 2)
    assert window_keys(store) == [ws.prefix + b"m/closed"]


def _feed(db: PartitionStore, ws: WindowStore) -> list[tuple[Window, bytes]]:
    events = [(5, b"a", 1), (17, b"b/x", 2), (3, b"a", 4), (31, b"\x01", 8), (12, b"a", 16)]
    events += [(2, b"b/x", 32), (44, b"a", 64), (29, b"c", 128), (60, b"b/x", 256)]
    closed: list[tuple[Window, bytes]] = []
    now = -1
    for offset, chunk in enumerate((events[:3], events[3:6], events[6:])):
        txn = TableTransaction(db)
        for ts, key, amount in chunk:
            now = max(now, ts)
            ws.update(txn, key, ts, now, add(amount))
        closed += ws.close_due(txn, now)
        db.apply(txn.changes, offset)
    return closed


def test_same_updates_give_identical_bytes_and_close_order(tmp_path: Path) -> None:
    manager = StoreManager(tmp_path, SMALL)
    one, two = manager.open("windows", 0), manager.open("windows", 1)
    try:
        decl = Windows.hopping(20, 5, grace_ms=4)
        closed_one = _feed(one, WindowStore("w", decl))
        closed_two = _feed(two, WindowStore("w", decl))
        assert closed_one == closed_two and len(closed_one) > 3
        assert one.items() == two.items() and len(window_keys(one)) > 3
        assert one.changelog_offset() == two.changelog_offset() == 2
    finally:
        one.close()
        two.close()


# ---- property: every input lands in exactly one closed window, or is late ----------------------

_KEYS = [b"a", b"a/", b"a/0", b"\x01", b"a\x00", b""]

#: ("record", event time offset from the stream time (out of order when negative), key index,
#:  amount, lag of the stream time passed to the store behind the partition's, or -3..-1 to
#:  pass one ms before, at, or after the close of the record's earliest window);
#: ("close", limit, 0 for the stream time or -3..-1 for around the earliest close, 0, 0);
#: ("commit", 0, 0, 0, 0). Stream times passed are never ahead of the partition's.
Op = tuple[str, int, int, int, int]
_record: st.SearchStrategy[Op] = st.tuples(
    st.just("record"),
    st.integers(-40, 10),
    st.integers(0, len(_KEYS) - 1),
    st.integers(1, 1000),
    st.integers(-3, 20),
)
_ops: st.SearchStrategy[list[Op]] = st.lists(
    st.one_of(
        _record,
        _record,  # records twice as often as the others
        st.tuples(st.just("close"), st.integers(1, 4), st.integers(-3, 0), st.just(0), st.just(0)),
        st.tuples(st.just("commit"), st.just(0), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=10,
    max_size=80,
)


def _collecting(ident: int, amount: int) -> Fold:
    """A fold keeping the ids it saw and the sum of their amounts."""

    def fold(window: Window, current: bytes | None) -> bytes:
        state: dict[str, Any] = {"ids": [], "sum": 0} if current is None else json.loads(current)
        state["ids"].append(ident)
        state["sum"] += amount
        return json.dumps(state, sort_keys=True).encode()

    return fold


def _starts(size: int, advance: int, ts: int) -> list[int]:
    """The definition of the windows containing `ts`, by brute force."""
    return [s for s in range(0, ts + 1, advance) if s <= ts < s + size]


@settings(max_examples=150, deadline=None)
@given(ops=_ops, size=st.integers(1, 30), hops=st.integers(1, 4), grace=st.integers(0, 20))
def test_every_input_is_closed_exactly_once_per_window_or_late(
    ops: list[Op], size: int, hops: int, grace: int
) -> None:
    advance = max(1, size // hops)
    decl = Windows.hopping(size, advance, grace)
    ws = WindowStore("prop", decl)
    with tempfile.TemporaryDirectory() as root:
        db = StoreManager(Path(root), SMALL).open("windows", 0)
        try:
            txn = TableTransaction(db)
            offset = 0
            running = -1  # the partition's stream time
            seen = -1  # the largest stream time passed to the store so far
            amounts: dict[int, int] = {}
            times: dict[int, int] = {}
            late: set[tuple[int, bytes, int]] = set()  # (record, key, start)
            model: dict[tuple[bytes, int], bytes] = {}  # the open windows and their values
            closed: list[tuple[Window, bytes]] = []

            def close(stream_time: int, limit: int) -> int:
                nonlocal seen
                seen = max(seen, stream_time)
                page = ws.close_due(txn, stream_time, limit)
                assert len(page) <= limit
                for window, value in page:
                    assert decl.close_time(window.start) <= stream_time
                    assert model.pop((window.key, window.start)) == value
                if len(page) < limit:  # nothing due is left behind
                    assert all(decl.close_time(s) > stream_time for _, s in model)
                closed.extend(page)
                return len(page)

            def check_open() -> None:
                for key in _KEYS:
                    assert ws.open_windows(txn, key) == [
                        (decl.window(key, s), model[key, s]) for k, s in sorted(model) if k == key
                    ]

            for ident, (kind, a, b, c, d) in enumerate(ops):
                if kind == "record":
                    ts, key, amount, lag = max(0, running + a), _KEYS[b], c, d
                    times[ident] = ts
                    running = max(running, ts)
                    if lag >= 0:  # monotone-ish: a caller may lag behind
                        now = running - lag
                    else:  # probe the boundary: late exactly when end + grace <= stream time
                        now = min(running, decl.close_time(_starts(size, advance, ts)[0]) + lag + 2)
                    seen = max(seen, now)
                    amounts[ident] = amount
                    update = ws.update(txn, key, ts, now, _collecting(ident, amount))
                    got = sorted(w.start for w in update.updated + update.late)
                    assert got == _starts(size, advance, ts)
                    for window in update.late:  # late only once stream time passed its close
                        assert decl.close_time(window.start) <= seen
                        late.add((ident, key, window.start))
                    for window in update.updated:  # and always late when this one did
                        assert decl.close_time(window.start) > now
                        value = ws.get(txn, key, window.start)
                        assert value is not None
                        model[key, window.start] = value
                elif kind == "close":
                    due = min((decl.close_time(s) for _, s in model), default=running)
                    close(running if b == 0 else min(running, due + b + 2), a)
                else:
                    db.apply(txn.changes, offset)
                    offset += 1
                    txn = TableTransaction(db)
                    check_open()
            check_open()
            while close(MAX_TIME, 7):  # the end of time closes everything left
                pass
            assert model == {}
            db.apply(txn.changes, offset)
            assert window_keys(db) in ([], [ws.prefix + b"m/closed"])

            # each (key, start) closed once, in (close time, start, key) order overall
            order = [(decl.close_time(w.start), w.start, w.key) for w, _ in closed]
            assert order == sorted(order) and len(set(order)) == len(order)
            landed: set[tuple[int, bytes, int]] = set()
            for window, value in closed:
                assert window.end == window.start + size
                state = json.loads(value)
                assert state["ids"] and state["sum"] == sum(amounts[i] for i in state["ids"])
                for i in state["ids"]:
                    spot = (i, window.key, window.start)
                    assert spot not in landed and spot not in late
                    landed.add(spot)
            # every (record, containing window) was closed in exactly one window, or was late
            expected = {
                (ident, _KEYS[b], start)
                for ident, (kind, _, b, _, _) in enumerate(ops)
                if kind == "record"
                for start in _starts(size, advance, times[ident])
            }
            assert landed | late == expected
        finally:
            db.close()
