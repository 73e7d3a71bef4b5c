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

from typing import Any, cast

import aiohttp
from aiohttp import web

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
#: Response headers passed back from the owner.
_PASSED_BACK = ("Content-Type", H_PARTITION, H_SERVED_BY, "Retry-After")


def unavailable(partition: int, why: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of a 503 that says why and when to ask again."""
    body = {"error": why, "partition": partition, "retry_after_s": RETRY_AFTER_S}
    return 503, body, {"Retry-After": str(RETRY_AFTER_S), H_PARTITION: str(partition)}


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

    async def forward(self, request: Any, owner: str, partition: int) -> web.Response:
        req = cast(web.Request, request)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[H_HOP] = "1"
        body = await req.read()
        url = f"http://{owner}{req.path_qs}"
        try:
            async with self._client().request(req.method, url, headers=headers,
                                              data=body or None) as resp:  # fmt: skip
                payload = await resp.read()
                passed = {h: resp.headers[h] for h in _PASSED_BACK if h in resp.headers}
                passed[H_FORWARDED_BY] = self.endpoint
                return web.Response(body=payload, status=resp.status, headers=passed)
        except (TimeoutError, aiohttp.ClientError) as exc:
            status, out, hdrs = unavailable(
                partition, f"the owner {owner} did not answer: {type(exc).__name__}"
            )
            hdrs[H_FORWARDED_BY] = self.endpoint
            return web.json_response(out, status=status, headers=hdrs)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
