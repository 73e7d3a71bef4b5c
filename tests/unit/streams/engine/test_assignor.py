"""The host-aware assignor: range assignment (partition p of every topic to one member)
plus the owner map every member receives, over aiokafka's own metadata and protocol
structs (what the group coordinator hands it); the join through a broker is in
tests/e2e/streams/ops/test_e2e_any_worker.py."""

from __future__ import annotations

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata
from aiokafka.protocol.metadata import MetadataResponse_v0

from paysaga.streams.engine.assignor import HostAwareAssignor

TOPICS = ["payments.in", "payments.other"]


def cluster(partitions: int = 3) -> ClusterMetadata:
    c = ClusterMetadata()
    layout = [(0, p, 0, [0], [0]) for p in range(partitions)]
    c.update_metadata(MetadataResponse_v0([(0, "localhost", 9092)],
                                          [(0, t, layout) for t in TOPICS]))  # fmt: skip
    return c


def joined(*assignors: HostAwareAssignor) -> dict[str, ConsumerProtocolMemberMetadata]:
    """Each member's metadata as the leader decodes it from the JoinGroup response."""
    return {f"member-{i}": ConsumerProtocol.METADATA.decode(a.metadata(TOPICS).encode())
            for i, a in enumerate(assignors)}  # fmt: skip


def test_every_member_learns_which_endpoint_owns_each_task() -> None:
    a, b = HostAwareAssignor("127.0.0.1:7001"), HostAwareAssignor("127.0.0.1:7002")
    members = joined(a, b)
    out = a.assign(cluster(), members)  # a leads
    plain = RangePartitionAssignor.assign(cluster(), members)
    assert {m: x.assignment for m, x in out.items()} == {m: x.assignment for m, x in plain.items()}
    for member, assignor in (("member-0", a), ("member-1", b)):
        wire = ConsumerProtocol.ASSIGNMENT.decode(out[member].encode())
        assignor.on_assignment(wire)
    assert a.owners == b.owners == {0: "127.0.0.1:7001", 1: "127.0.0.1:7001",
                                    2: "127.0.0.1:7002"}  # fmt: skip
    # co-partitioned: each member's partitions are the same numbers on every topic
    for x in out.values():
        assert len({tuple(parts) for _, parts in x.assignment}) == 1


def test_a_member_without_an_endpoint_owns_tasks_nobody_forwards_to() -> None:
    a = HostAwareAssignor("127.0.0.1:7001")
    members = joined(a)
    members["old"] = ConsumerProtocolMemberMetadata(0, TOPICS, b"")  # an older worker
    out = a.assign(cluster(4), members)
    a.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(out["member-0"].encode()))
    mine = {p for _, parts in out["member-0"].assignment for p in parts}
    assert a.owners == {p: "127.0.0.1:7001" for p in mine} and len(mine) < 4


def test_an_unreadable_assignment_leaves_no_map() -> None:
    a = HostAwareAssignor("127.0.0.1:7001")
    a.owners = {0: "stale:1"}
    out = RangePartitionAssignor.assign(cluster(), joined(a))
    a.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(out["member-0"].encode()))
    assert a.owners == {}  # the group agreed on plain range: nobody has the map


def test_only_a_plain_host_port_is_an_endpoint() -> None:
    from paysaga.streams.engine.assignor import is_endpoint

    assert is_endpoint("worker-1:6066") and is_endpoint("10.0.0.7:80") and is_endpoint("[::1]:9")
    for bad in ("u@h:1", "h:1/x", "h:1?q", "http://h:1", "h", "h:0", "h:70000", ":80"):
        assert not is_endpoint(bad), bad
    a = HostAwareAssignor("127.0.0.1:7001")
    members = joined(a)
    members["odd"] = ConsumerProtocolMemberMetadata(0, TOPICS, b'{"endpoint": "evil/x?:1"}')
    out = a.assign(cluster(4), members)
    a.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(out["member-0"].encode()))
    assert set(a.owners.values()) == {"127.0.0.1:7001"}


def test_a_task_split_between_members_has_no_owner() -> None:
    """A member subscribed to fewer topics: range assigns each topic on its own, so
    partition 1 of one topic and of the other can go to different members."""
    a, b = HostAwareAssignor("127.0.0.1:7001"), HostAwareAssignor("127.0.0.1:7002")
    members = {"m1": ConsumerProtocol.METADATA.decode(a.metadata(TOPICS).encode()),
               "m2": ConsumerProtocol.METADATA.decode(b.metadata(TOPICS[:1]).encode())}  # fmt: skip
    out = a.assign(cluster(3), members)
    a.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(out["m1"].encode()))
    by_topic = {m: dict(x.assignment) for m, x in out.items()}
    for p, owner in a.owners.items():
        holders = {m for m, t in by_topic.items() for parts in t.values() if p in parts}
        assert len(holders) == 1, (p, owner, holders)
