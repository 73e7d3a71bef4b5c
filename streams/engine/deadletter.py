"""Dead letters: the original bytes plus headers that say why, from where, and how often.

Nothing undecodable or invalid is dropped: it lands on the dead-letter topic with its
reason, and the stream goes on. The engine runs every reason through the application's
`EngineConfig.redact` before it gets here (paysaga's removes anything that looks like a
card number), so sensitive text never reaches the headers; the value keeps the original
bytes for forensic redrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

H_REASON = "paysaga.error.reason"
H_KIND = "paysaga.error.kind"
H_TOPIC = "paysaga.source.topic"
H_PARTITION = "paysaga.source.partition"
H_OFFSET = "paysaga.source.offset"
H_ATTEMPTS = "paysaga.attempts"
H_FAILED_AT = "paysaga.failed_at"
MAX_REASON = 1000


@dataclass(frozen=True)
class DeadLetter:
    """Why one input record could not be processed."""

    kind: str  # decode | validation | transition | poison
    reason: str
    topic: str
    partition: int
    offset: int
    attempts: int = 1

    def headers(self) -> list[tuple[str, bytes]]:
        reason = self.reason[:MAX_REASON]
        return [
            (H_KIND, self.kind.encode()),
            (H_REASON, reason.encode()),
            (H_TOPIC, self.topic.encode()),
            (H_PARTITION, str(self.partition).encode()),
            (H_OFFSET, str(self.offset).encode()),
            (H_ATTEMPTS, str(self.attempts).encode()),
            (H_FAILED_AT, str(int(time.time() * 1000)).encode()),
        ]


def parse_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """DLQ headers back as a str dict (for `paysaga dlq list/show` and tests)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}
