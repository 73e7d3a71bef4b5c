"""Who owns which task, from the consumer group itself (Kafka Streams' `application.server`).

Each member puts the endpoint it answers queries at into its group metadata (`user_data`
of the JoinGroup). The leader assigns partitions exactly as the range assignor does (so
partition p of every co-partitioned topic goes to one member: one task) and tells every
member, in its assignment's `user_data`, which endpoint owns each partition number. So a
worker knows where to forward a query for a key it does not own, from the same group
generation that decided its own tasks, not from a guess.

A member that does not speak this protocol (an older worker during a rolling upgrade)
offers only plain `range`; the group then agrees on `range` and nobody has the map: views
answer 503 for keys they do not own, never a wrong answer.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

log = logging.getLogger(__name__)


#: host:port, the host a name or an address ([v6] in brackets): nothing a URL could be
#: bent with (no user, path, query or scheme), since views forward requests there.
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})$")


def is_endpoint(text: str) -> bool:
    match = _ENDPOINT.match(text)
    return match is not None and 0 < int(match.group(2)) <= 65535


def _endpoint_of(metadata: ConsumerProtocolMemberMetadata) -> str | None:
    try:
        endpoint = json.loads(metadata.user_data or b"{}").get("endpoint")
    except (ValueError, AttributeError):
        return None
    return endpoint if isinstance(endpoint, str) and is_endpoint(endpoint) else None


class HostAwareAssignor(RangePartitionAssignor):
    """The range assignment plus the map of partition number -> owner endpoint. An
    instance per consumer: `metadata` sends this member's endpoint, `on_assignment` keeps
    the map the leader sent (`owners`, with the group generation's own consistency)."""

    name = "paysaga-range"
    version = 0

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        #: Partition number -> endpoint of its owner, as of the last assignment.
        self.owners: dict[int, str] = {}

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        body = json.dumps({"endpoint": self.endpoint}).encode()
        return ConsumerProtocolMemberMetadata(self.version, list(topics), body)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        base = super().assign(cluster, members)
        claims: defaultdict[int, set[str | None]] = defaultdict(set)
        for member, a in base.items():
            endpoint = _endpoint_of(members[member])
            for _topic, partitions in a.assignment:
                for p in partitions:
                    claims[p].add(endpoint)
        # A task is one member's only when every topic's partition p went to it (members
        # subscribed alike, topics co-partitioned): otherwise nobody is named, and views
        # answer 503 rather than send a query to half an owner.
        owners = {p: next(iter(e)) for p, e in claims.items() if len(e) == 1 and None not in e}
        split = sorted(p for p, e in claims.items() if len(e) > 1)
        if split:
            log.warning("tasks %s are split between members: no owner named for them", split)
        body = json.dumps({"owners": {str(p): e for p, e in sorted(owners.items())}}).encode()
        return {m: ConsumerProtocolMemberAssignment(a.version, a.assignment, body)
                for m, a in base.items()}  # fmt: skip

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        try:
            raw = json.loads(assignment.user_data or b"{}").get("owners", {})
            self.owners = {int(p): str(e) for p, e in raw.items()}
        except (ValueError, AttributeError, TypeError):
            log.warning("assignment without a readable owner map: views will not forward")
            self.owners = {}
