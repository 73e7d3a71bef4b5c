"""Dead letters: the original bytes plus headers that say why, from where, and how often.

Nothing undecodable or invalid is dropped: it lands on the dead-letter topic with its
reason, and the stream goes on. The engine runs every reason through the application's
`EngineConfig.redact` before it gets here (paysaga's removes anything that looks like a
card number), so sensitive text never reaches the headers; the value keeps the original
bytes for forensic redrive (docs/dlq.md).

The input's own headers are kept under `paysaga.original.<name>`, in their order, rather
than as they were beside ours. Kafka headers are a list that allows repeated names, and an
input may itself carry `paysaga.*` headers (the repartition hop's `paysaga.source`, or a
record someone copied off a DLQ): mixed with ours, a reader could not tell which
`paysaga.error.kind` is the letter's, and a redrive could not give back exactly what the
step first read. Prefixed, the letter's own headers are unambiguous and the originals come
back byte for byte (`original_headers`).

The one exception is what a redrive added (`paysaga.redrive.*`): those describe the letter's
history, not the input, so they are lifted into the new letter as they are. A record that
fails again after a redrive thus keeps its redrive count, its redrive id, the coordinates
where it first failed and its first failure time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

H_REASON = "paysaga.error.reason"
H_KIND = "paysaga.error.kind"
#: `transient`, `unknown` or `permanent`: whether the same input may succeed later.
H_ERROR_CLASS = "paysaga.error.class"
H_TOPIC = "paysaga.source.topic"
H_PARTITION = "paysaga.source.partition"
H_OFFSET = "paysaga.source.offset"
H_ATTEMPTS = "paysaga.attempts"
#: Kept for readers of the first header set: the same value as `H_LAST_FAILED_AT`.
H_FAILED_AT = "paysaga.failed_at"
H_FIRST_FAILED_AT = "paysaga.first_failed_at"
H_LAST_FAILED_AT = "paysaga.last_failed_at"
#: On a review record that can be taken up again: the topic its value (an input that
#: resumes it) goes to when redriven. Absent: a human decides, nothing to re-inject.
H_RESUME_TOPIC = "paysaga.resume.topic"
#: Prefix of the input record's own headers on a dead letter.
ORIGINAL_PREFIX = "paysaga.original."

#: Headers a redrive adds to the record it re-injects (and a new letter carries forward).
REDRIVE_PREFIX = "paysaga.redrive."
H_REDRIVE_ID = REDRIVE_PREFIX + "id"
H_REDRIVE_COUNT = REDRIVE_PREFIX + "count"
#: `<partition>:<offset>` on the DLQ of the letter this record was redriven from.
H_REDRIVE_DLQ = REDRIVE_PREFIX + "dlq"
#: Where the record failed the first time, before any redrive.
H_ORIGIN_TOPIC = REDRIVE_PREFIX + "origin.topic"
H_ORIGIN_PARTITION = REDRIVE_PREFIX + "origin.partition"
H_ORIGIN_OFFSET = REDRIVE_PREFIX + "origin.offset"
H_ORIGIN_FIRST_FAILED_AT = REDRIVE_PREFIX + "first_failed_at"

MAX_REASON = 1000
ERROR_CLASSES = ("transient", "unknown", "permanent")
#: Kinds the same bytes would fail again with, whenever they are processed: bad bytes, bad
#: fields, a refused transition, an agent raising on them.
PERMANENT_KINDS = frozenset({"decode", "validation", "transition", "poison"})

Headers = Iterable[tuple[str, bytes]]


def now_ms() -> int:
    return int(time.time() * 1000)


def default_error_class(kind: str) -> str:
    """The class of a kind whose caller gave none: permanent for the engine's own kinds,
    unknown otherwise (an application kind says its class explicitly when it knows)."""
    return "permanent" if kind in PERMANENT_KINDS else "unknown"


@dataclass(frozen=True)
class DeadLetter:
    """Why one input record could not be processed."""

    kind: str  # decode | validation | transition | poison | an application's own
    reason: str
    topic: str
    partition: int
    offset: int
    attempts: int = 1
    #: None: `default_error_class(kind)`.
    error_class: str | None = None
    #: The input record's own headers (kept prefixed; redrive headers carried forward).
    input_headers: tuple[tuple[str, bytes], ...] = ()
    #: When it failed (epoch ms); the last failure of this letter.
    failed_at: int = field(default_factory=now_ms)
    #: An earlier failure of this same input, if any (a poison record's first attempt).
    earlier_failure: int | None = None
    #: A review record's resume topic (`H_RESUME_TOPIC`).
    resume_topic: str | None = None

    def __post_init__(self) -> None:
        if self.error_class is not None and self.error_class not in ERROR_CLASSES:
            raise ValueError(f"error class {self.error_class!r} is not one of {ERROR_CLASSES}")

    @property
    def klass(self) -> str:
        return self.error_class or default_error_class(self.kind)

    @property
    def first_failed_at(self) -> int:
        """The first failure ever: the one a redriven input carries, else the earliest of
        this input's own."""
        first = self.failed_at if self.earlier_failure is None else min(
            self.failed_at, self.earlier_failure)  # fmt: skip
        for name, value in self.input_headers:
            if name == H_ORIGIN_FIRST_FAILED_AT:
                try:
                    return min(int(value), first)
                except ValueError:
                    break  # a mangled header: this input's failures are all we know of
        return first

    def headers(self) -> list[tuple[str, bytes]]:
        reason = self.reason[:MAX_REASON]
        last = str(self.failed_at).encode()
        ours = [
            (H_KIND, self.kind.encode()),
            (H_REASON, reason.encode()),
            (H_ERROR_CLASS, self.klass.encode()),
            (H_TOPIC, self.topic.encode()),
            (H_PARTITION, str(self.partition).encode()),
            (H_OFFSET, str(self.offset).encode()),
            (H_ATTEMPTS, str(self.attempts).encode()),
            (H_FIRST_FAILED_AT, str(self.first_failed_at).encode()),
            (H_LAST_FAILED_AT, last),
            (H_FAILED_AT, last),
        ]
        if self.resume_topic:
            ours.append((H_RESUME_TOPIC, self.resume_topic.encode()))
        carried = [(k, v) for k, v in self.input_headers if k.startswith(REDRIVE_PREFIX)]
        kept = [
            (ORIGINAL_PREFIX + k, v)
            for k, v in self.input_headers
            if not k.startswith(REDRIVE_PREFIX)
        ]
        return ours + carried + kept


def original_headers(headers: Headers | None) -> list[tuple[str, bytes]]:
    """The input record's own headers back from a dead letter's, in their order."""
    n = len(ORIGINAL_PREFIX)
    return [(k[n:], v) for k, v in headers or () if k.startswith(ORIGINAL_PREFIX)]


def parse_headers(headers: Headers | None) -> dict[str, str]:
    """DLQ headers back as a str dict (for `paysaga dlq list/show` and tests)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}
