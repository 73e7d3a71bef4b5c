"""Composite keys of the merchant-keyed tables (`recon`, `settlement`), and paged scans.

A key is a one-letter kind, then NUL-separated parts. Ids never hold NUL (`check_part`
refuses them), so the entries under one prefix (a window's, a batch's) are one contiguous
range of RocksDB's byte order, read a page at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

from paysaga.tables.transaction import TableTransaction

SEP = b"\x00"
_WIDTH = 15  # epoch millis, zero-padded: byte order is time order
_PAGE = 1_000


class KeyPartError(ValueError):
    """An id that cannot be part of a composite key (it holds a NUL byte)."""


def check_part(part: str) -> bytes:
    raw = part.encode()
    if SEP in raw:
        raise KeyPartError(f"id {part!r} holds a NUL byte")
    return raw


def key(kind: bytes, *parts: str) -> bytes:
    return kind + SEP + SEP.join(check_part(p) for p in parts)


def scope_id(merchant: str, currency: str, start: int) -> bytes:
    """merchant, currency and zero-padded start: a window's or a batch's key suffix, and
    its timer key."""
    padded = str(start).zfill(_WIDTH).encode()
    return SEP.join((check_part(merchant), check_part(currency), padded))


def parse_scope_id(raw: bytes) -> tuple[str, str, int]:
    merchant, currency, start = raw.split(SEP)
    return merchant.decode(), currency.decode(), int(start)


def scan(table: TableTransaction, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every entry under `prefix`, a page at a time (a window may hold millions)."""
    lo, hi = prefix, prefix + b"\xff"
    while True:
        page = table.range(lo, hi, _PAGE)
        yield from page
        if len(page) < _PAGE:
            return
        lo = page[-1][0] + b"\x00"
