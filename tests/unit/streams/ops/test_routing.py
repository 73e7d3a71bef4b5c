"""Connections dropped around a worker that goes away, with real sockets and no Kafka: what
the client of a killed worker sees, and what a live worker answers when its forward hits an
owner that went away (tests/e2e/streams/ops/test_e2e_any_worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from paysaga.streams.app.net import free_port
from paysaga.streams.app.settings import Settings
from paysaga.streams.ops.routing import (
    H_FORWARDED_BY,
    H_PARTITION,
    H_SERVED_BY,
    Forwarder,
    forwardable,
)
from tests.support import WorkerProcess

#: A stand-in worker: its first request is answered, the next one never is (it is in its
#: handler when the test SIGKILLs it). It prints a line as each request arrives.
SLOW_WORKER = """
import asyncio, sys
from aiohttp import web
seen = 0
async def view(request):
    global seen
    seen += 1
    print("request", flush=True)
    if seen > 1:
        await asyncio.sleep(60)
    return web.json_response({"payment_id": "p"}, headers={"X-Paysaga-Partition": "0"})
app = web.Application()
app.router.add_get("/payments/{pid}/", view)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: print("up", flush=True))
"""


def test_a_worker_killed_while_a_request_is_in_flight_drops_it_at_once(tmp_path: Path) -> None:
    """The e2e symptom: status 0 within a moment, not a timeout, from a request sent while
    the worker was still up and listed as live, then SIGKILLed before it answered (the e2e
    test removes a worker from `live` and kills it while such a request is in flight)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, str(port)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        w = WorkerProcess(Settings(web_port=port), tmp_path / "w.log")
        w.proc = proc
        assert w.request("/payments/p/")[0] == 200
        assert proc.stdout.readline().strip() == "request"
        out: list[tuple[int, float, str]] = []

        def ask() -> None:
            t = time.monotonic()
            try:  # what `WorkerProcess.request` reports as 0
                with urllib.request.urlopen(w.base_url + "/payments/p/", timeout=20.0):
                    out.append((200, time.monotonic() - t, ""))
            except OSError as exc:
                out.append((0, time.monotonic() - t, type(exc).__name__))

        thread = threading.Thread(target=ask)
        thread.start()
        assert proc.stdout.readline().strip() == "request"  # in the worker's handler now
        w.kill()
        thread.join(10)
    finally:
        proc.kill()
        proc.wait()
    [(code, took, why)] = out
    # the connection was accepted and the request read: the kill drops it, it is not refused
    assert code == 0 and took < 5.0 and why in ("RemoteDisconnected", "ConnectionResetError"), out


async def stale_owner(mode: str) -> tuple[asyncio.Server, int]:
    """An owner that answers its first request and keeps the connection alive, then drops
    every later request unanswered, as a worker going away (aiohttp's client retries an
    idempotent request once on a fresh connection: that one is dropped too): `close` sends
    a FIN (ServerDisconnectedError), `reset` an RST (ClientOSError, ConnectionResetError)."""
    answered = False

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                if answered:
                    if mode == "reset":
                        linger = struct.pack("ii", 1, 0)
                        writer.get_extra_info("socket").setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, linger
                        )
                        writer.transport.abort()
                    else:
                        writer.close()
                    return
                answered = True
                body = b'{"payment_id": "p"}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: keep-alive\r\nX-Paysaga-Partition: 0\r\n"
                             b"X-Paysaga-Served-By: owner\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def serve(view: Any) -> tuple[web.AppRunner, int]:
    """`view` answering GET /payments/{pid}/ on a free loopback port."""
    app = web.Application()
    app.router.add_get("/payments/{pid}/", view)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.mark.parametrize("mode", ["close", "reset"])
def test_a_forward_over_a_pooled_connection_the_owner_dropped_answers_503(
    mode: str, tmp_path: Path
) -> None:
    """The live worker's side: its pooled keep-alive connection to the owner is stale when
    it forwards; it answers 503 with Retry-After, it does not drop its client."""

    async def main() -> list[tuple[int, dict[str, Any], dict[str, str]]]:
        owner, owner_port = await stale_owner(mode)
        forwarder = Forwarder("front", 2000)

        async def view(request: web.Request) -> web.StreamResponse:
            owner_at = f"127.0.0.1:{owner_port}"
            answer = await forwarder.send(request.method, owner_at, request.path_qs, [], b"", 0)
            return answer.response()

        runner, port = await serve(view)
        w = WorkerProcess(Settings(web_port=port), tmp_path / "front.log")
        try:
            answers = []
            for _ in range(2):  # the second forward reuses the pooled connection
                code, body, headers = await asyncio.to_thread(w.request, "/payments/p/")
                answers.append((code, json.loads(body) if body else {}, headers))
            return answers
        finally:
            await forwarder.close()
            await runner.cleanup()
            owner.close()

    (code1, body1, h1), (code2, body2, h2) = asyncio.run(main())
    assert code1 == 200 and body1 == {"payment_id": "p"} and h1[H_SERVED_BY] == "owner"
    assert h1[H_FORWARDED_BY] == "front"
    assert code2 == 503 and h2["Retry-After"] and h2[H_PARTITION] == "0", (code2, body2)
    assert h2[H_FORWARDED_BY] == "front" and "did not answer" in body2["error"]


def test_a_forward_keeps_repeated_headers_and_drops_those_of_the_connection() -> None:
    """Every value of a repeated header reaches the owner, in order; the client's
    connection headers do not, nor any header its Connection header names (RFC 9110
    section 7.6.1), and the hop mark is added."""

    async def main() -> dict[str, Any]:
        async def echo(request: web.Request) -> web.StreamResponse:
            h = request.headers
            return web.json_response({"multi": h.getall("X-Multi", []), "secret": h.get("X-Secret"),
                                      "keep": h.get("Keep-Alive"), "hop": h.get("X-Paysaga-Hop"),
                                      "auth": h.getall("Authorization", [])})  # fmt: skip

        forwarder = Forwarder("front", 2000)

        async def front(request: web.Request) -> web.StreamResponse:
            answer = await forwarder.send(request.method, f"127.0.0.1:{owner_port}",
                                          request.path_qs, forwardable(request.headers),
                                          await request.read(), 0)  # fmt: skip
            return answer.response()

        (owner, owner_port), (runner, front_port) = await serve(echo), await serve(front)
        runners = [owner, runner]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
            writer.write(b"GET /payments/p/ HTTP/1.1\r\nHost: front\r\n"
                         b"X-Multi: a\r\nX-Multi: b\r\nAuthorization: Bearer t\r\n"
                         b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
                         b"Keep-Alive: timeout=5\r\n\r\n")  # fmt: skip
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))  # fmt: skip
            body = await reader.readexactly(length)
            writer.close()
            return dict(json.loads(body))
        finally:
            await forwarder.close()
            for runner in runners:
                await runner.cleanup()

    seen = asyncio.run(main())
    assert seen == {"multi": ["a", "b"], "secret": None, "keep": None, "hop": "1",
                    "auth": ["Bearer t"]}  # fmt: skip
