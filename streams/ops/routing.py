"""Any worker answers a keyed view: from its own committed state, by one hop to the owner,
or 503 with Retry-After while ownership is moving (docs/operations.md#any-worker-answers).

Ownership comes from the consumer group (`ExactlyOnceEngine.owner`, the map the group's
leader sent with this generation's assignment), never from a guess. A worker answers from
local state only for a task it has open, which means restored: a task being restored, or
one revoked, is not open. A forwarded request carries `X-Paysaga-Hop`, and the owner it
reaches answers it or says 503; it never forwards again, so a stale map costs one hop and
a retry, not a loop or a wrong answer. (Faust's own `table_route` forwards without the
body and has open multi-worker bugs, faust-streaming #514; this does not use it.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from paysaga.streams.engine import ExactlyOnceEngine
from paysaga.streams.engine.partitioner import partition_for
from paysaga.tables.store import PartitionStore

JSON = "application/json"

#: Which task partition answered, and which worker (its endpoint).
H_PARTITION = "X-Paysaga-Partition"
H_SERVED_BY = "X-Paysaga-Served-By"
#: Set by the worker that forwarded the request to the owner.
H_FORWARDED_BY = "X-Paysaga-Forwarded-By"
#: On a forwarded request: answer it here or 503, never forward it again.
H_HOP = "X-Paysaga-Hop"
#: Seconds a client should wait before asking again while ownership moves.
RETRY_AFTER_S = 1
#: Request headers that describe one connection, not the request (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-connection",
                         "te", "trailer", "transfer-encoding", "upgrade", "host",
                         "content-length"})  # fmt: skip


def forwardable(headers: Any) -> list[tuple[str, str]]:
    """A request's headers as they go on to the owner: every value of a repeated header,
    in order, without those that describe the client's connection, the fixed ones and
    any its `Connection` header names (RFC 9110 section 7.6.1)."""
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    drop = _HOP_BY_HOP | named
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


#: Response headers passed back from the owner.
_PASSED_BACK = ("Content-Type", H_PARTITION, H_SERVED_BY, "Retry-After")


def unavailable(partition: int, why: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of a 503 that says why and when to ask again."""
    body = {"error": why, "partition": partition, "retry_after_s": RETRY_AFTER_S}
    return 503, body, {"Retry-After": str(RETRY_AFTER_S), H_PARTITION: str(partition)}


@dataclass(frozen=True)
class Answer:
    """A keyed read's answer, wherever it was served: status, body and headers."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def response(self) -> web.Response:
        return web.Response(body=self.body, status=self.status, headers=self.headers)


def unavailable_answer(partition: int, why: str, **extra: str) -> Answer:
    status, body, headers = unavailable(partition, why)
    headers.update(extra)
    return Answer(status, json.dumps(body).encode(), {**headers, "Content-Type": JSON})


class Forwarder:
    """One hop to the owner: the method, headers and body go with the request, within a
    timeout, over one pooled HTTP session per worker."""

    def __init__(self, endpoint: str, timeout_ms: int) -> None:
        self.endpoint = endpoint
        self.timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def send(self, method: str, owner: str, path_qs: str,
                   headers: Iterable[tuple[str, str]], body: bytes,
                   partition: int) -> Answer:  # fmt: skip
        """`method path_qs` on `owner`, marked as a hop: its answer, or a 503 that says the
        owner did not answer. `headers` may repeat a name: each value goes."""
        sent = CIMultiDict(headers)
        sent[H_HOP] = "1"
        try:
            async with self._client().request(
                method, f"http://{owner}{path_qs}", headers=sent, data=body or None
            ) as resp:
                payload = await resp.read()
                passed = {h: resp.headers[h] for h in _PASSED_BACK if h in resp.headers}
                passed[H_FORWARDED_BY] = self.endpoint
                return Answer(resp.status, payload, passed)
        except (TimeoutError, aiohttp.ClientError) as exc:
            why = f"the owner {owner} did not answer: {type(exc).__name__}"
            return unavailable_answer(partition, why, **{H_FORWARDED_BY: self.endpoint})

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


#: Renders a keyed view from the owner's committed state: (status, JSON body).
Render = Callable[[PartitionStore], tuple[int, bytes]]


class Router:
    """Reads a key's view where its task lives: here, from committed local state; else one
    hop to the owner the group names; else 503. Views and the payments API both read
    through it, so they agree on where a key is served and on what "moving" means."""

    def __init__(self, engine: ExactlyOnceEngine, partitions: int, endpoint: str,
                 forwarder: Forwarder, token: str | None) -> None:  # fmt: skip
        self.engine, self.partitions, self.me = engine, partitions, endpoint
        self.forwarder, self.token = forwarder, token

    def partition(self, key: bytes) -> int:
        return partition_for(key, self.partitions)

    async def read(self, key: bytes, table: str, render: Render, path: str,
                   request: Any | None = None) -> Answer:  # fmt: skip
        """The view of `key` in `table`. `request` is the client's, forwarded as it came
        when the owner is elsewhere; without one (the API reading state), a GET of `path`
        with this worker's token goes there instead."""
        partition = self.partition(key)
        store = self.engine.serving(table, partition)
        if store is not None:
            status, body = render(store)
            return Answer(status, body, {"Content-Type": JSON, H_PARTITION: str(partition),
                                         H_SERVED_BY: self.me})  # fmt: skip
        owner = self.engine.owner(partition)
        hop = request is not None and bool(request.headers.get(H_HOP))
        if hop or owner is None or owner == self.me:
            why = (f"task {partition} is moving between workers (a rebalance or a restore)"
                   if owner != self.me else f"task {partition} is not serving here yet "
                   "(being restored or rebuilt)")  # fmt: skip
            return unavailable_answer(partition, why)
        if request is not None:
            req = cast(web.Request, request)
            return await self.forwarder.send(req.method, owner, req.path_qs,
                                             forwardable(req.headers), await req.read(),
                                             partition)  # fmt: skip
        auth = [("Authorization", f"Bearer {self.token}")] if self.token else []
        return await self.forwarder.send("GET", owner, path, auth, b"", partition)
