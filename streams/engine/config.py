"""How one engine instance connects, names its internal topics and positions its inputs.

Everything an application decides about the engine is here, so the engine itself stays
free of application knowledge (docs/architecture.md#the-engine). The replay hooks are part
of it: where each input partition starts when the group has no committed offset yet, and
where it stops (docs/architecture.md#replay-hooks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition


@dataclass(frozen=True)
class StartAt:
    """Where a partition without a committed offset starts: an offset, or the first
    offset whose timestamp is at or after `timestamp_ms` (Kafka's offsets-for-times)."""

    offset: int | None = None
    timestamp_ms: int | None = None

    def __post_init__(self) -> None:
        if (self.offset is None) == (self.timestamp_ms is None):
            raise ValueError("StartAt needs exactly one of offset and timestamp_ms")


@dataclass(frozen=True)
class ReplaySource:
    """A replay's input: another application's journal (streams/engine/journal.py). Each
    entry's records are read from that application's topics and handed to this one's
    agents under this one's names (`rename`: its internal topics carry its own prefix)."""

    journal_topic: str
    rename: dict[str, str] = field(default_factory=dict)
    #: A reset's rebuild of the live application's own state (docs/replay.md#reset): the
    #: re-executed transactions write their changelog records and nothing else. Their
    #: outputs are in the live topics already, and the services have had the commands.
    rebuild: bool = False


@dataclass
class EngineConfig:
    bootstrap: str
    app_id: str
    dlq_topic: str
    changelog: Callable[[str], str]
    #: Consumer group of the application (an isolated replay has its own); app_id if None.
    group_id: str | None = None
    max_batch: int = 2000
    linger_ms: int = 0
    poll_timeout_ms: int = 100
    #: How long the broker may hold a fetch that finds no data (docs/operations.md#fetching).
    #: It costs no latency: a fetch returns as soon as a record is there. Shorter, each idle
    #: consumer asks the broker again and again: at 5 ms, two idle workers and the three
    #: simulators kept nearly a core of this machine busy, the broker's half of it.
    fetch_max_wait_ms: int = 100
    #: How often the fetch loop looks for due wall-clock schedules (each schedule has its
    #: own interval; this is the resolution).
    punctuate_ms: int = 500
    #: Consecutive failed attempts at one batch after which the task is rebuilt (a fresh
    #: producer: a refused record can leave the old one's sequence numbers unusable).
    max_attempts: int = 5
    #: A crashed worker's partitions wait this long before the group hands them on (and a
    #: restarted worker waits as long to join while its dead self is still a member).
    session_timeout_ms: int = 10_000
    #: Applied to every dead-letter reason (the application's scrubber of sensitive text).
    redact: Callable[[str], str] = str
    #: The idle policy's topic (docs/exactly-once.md#idle-partitions): a task that has seen
    #: no input for `idle_ms` of wall clock writes a stream-time tick to its partition here
    #: and reads it back as input, so idle partitions still close windows and fire
    #: stream-time timers, and a replay of the recorded input reproduces it. None: no ticks.
    tick_topic: str | None = None
    idle_ms: int = 5_000
    #: False when the tick topic belongs to another application (a replay reading the
    #: live inputs): its ticks are read as input, never written.
    write_ticks: bool = True
    #: Where input partitions with no committed offset start (replays); earliest if absent.
    start: dict[TopicPartition, StartAt] = field(default_factory=dict)
    #: Where input partitions stop: records at or past the offset are never processed, and
    #: a task whose inputs all reached their stop idles (`ExactlyOnceEngine.finished`).
    stop: dict[TopicPartition, int] = field(default_factory=dict)
    #: Where this worker answers queries (host:port), sent in its group metadata so every
    #: member learns which endpoint owns each task (streams/engine/assignor.py). None: the
    #: plain range assignor, and no owner map.
    endpoint: str | None = None
    #: How long a batch's agents run before the event loop gets a turn (views, heartbeats,
    #: other tasks' commits); 0: a batch runs to its end at once.
    slice_ms: float = 1.0
    #: The shortest time between the starts of two batches of one task (Kafka Streams'
    #: `commit.interval.ms`): records fetched sooner wait in the task's queue and join the
    #: next batch. Fewer, larger transactions when records trickle in; 0: a batch starts
    #: as soon as the last one committed. Never applied to a replay (each journal entry
    #: is its own transaction) or to a batch that is full already.
    commit_interval_ms: float = 0.0
    #: With a commit interval, how much data a fetch waits for (up to the interval) before
    #: the broker answers: fetching the records of a batch that waits anyway, one by one,
    #: is CPU for nothing on both sides.
    interval_fetch_min_bytes: int = 65_536
    #: Where each committed transaction records what it processed, for replays
    #: (streams/engine/journal.py). None: no journal.
    journal_topic: str | None = None
    #: A replay: the engine reads another application's journal instead of the topology's
    #: sources, and re-executes each entry (docs/replay.md).
    replay: ReplaySource | None = None

    @property
    def group(self) -> str:
        return self.group_id or self.app_id
