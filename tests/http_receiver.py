"""A real HTTP receiver for webhook tests: an aiohttp server on 127.0.0.1 that records and obeys.

Every request is recorded (headers, raw body, parsed records, the client's source port, the status
it was answered with). The receiver can be scripted while a test runs::

    async with HttpReceiver() as receiver:              # listens on 127.0.0.1, a free port
        sink = webhook.create("w", webhook.Options(url=receiver.url))
        receiver.reply(Reply(503, headers={"Retry-After": "7"}), Reply(400, body=b"bad"))
        ...                                             # the next two requests get 503, then 400;
                                                        # later ones get ``receiver.default_reply``
        receiver.stall()                                # requests now hang ...
        receiver.release()                              # ... until released (then answered)
        await receiver.go_away()                        # stop listening: connection refused
        await receiver.come_back()                      # listen again on the same port
        records = await receiver.wait_for_records(10)   # records of 2xx-answered requests

Pass ``ssl_context=`` for an https receiver. Every wait takes a bound (``timeout``, seconds).
:func:`verify_signature` checks a request's Standard Webhooks signature independently of amid.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["HttpReceiver", "ReceivedRequest", "Reply", "verify_signature"]


@dataclass(frozen=True)
class Reply:
    """How the receiver answers one request."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class ReceivedRequest:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    remote_port: int | None
    records: list[dict[str, Any]]
    parse_error: str | None = None
    status: int | None = None        # what it was answered with; None while stalled/unanswered

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_records(content_type: str, body: bytes) -> list[dict[str, Any]]:
    """Records in a webhook body: a JSON array (or one object), or NDJSON (one per line)."""
    if content_type == "application/x-ndjson":
        return [json.loads(line) for line in body.split(b"\n") if line.strip()]
    decoded = json.loads(body)
    return decoded if isinstance(decoded, list) else [decoded]


class HttpReceiver:
    """A scriptable HTTP server on 127.0.0.1 that records every request it gets."""

    def __init__(self, *, path: str = "/hook", ssl_context: ssl.SSLContext | None = None,
                 default_reply: Reply = Reply(200)) -> None:
        self.path = path
        self.default_reply = default_reply
        self.requests: list[ReceivedRequest] = []
        self._ssl_context = ssl_context
        self._replies: deque[Reply] = deque()
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._open = asyncio.Event()         # cleared while stalled
        self._open.set()
        self._going_away = False
        self._changed = asyncio.Event()      # replaced on every change; waiters re-check

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (a free port the first time, the same port afterwards)."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 << 20)  # batches can exceed the 1 MiB default
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner
        self._going_away = False

    async def stop(self) -> None:
        """Stop listening and drop every connection; stalled requests are aborted unanswered."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._going_away = True
        self._open.set()   # wake stalled handlers so they abort instead of holding shutdown up
        await runner.cleanup()
        self._notify()

    async def go_away(self) -> None:
        """Stop listening: connections to :attr:`port` are now refused."""
        await self.stop()

    async def come_back(self) -> None:
        """Listen again on the same port, answering normally (not stalled)."""
        await self.start()

    async def __aenter__(self) -> HttpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._port}{self.path}"

    # -- scripting ------------------------------------------------------------------------------

    def reply(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order (then ``default_reply``)."""
        self._replies.extend(replies)

    def stall(self) -> None:
        """Hold every request from now on until :meth:`release` (or stop)."""
        self._open.clear()

    def release(self) -> None:
        """Answer the held requests and stop stalling."""
        self._open.set()

    # -- what arrived ---------------------------------------------------------------------------

    @property
    def delivered_records(self) -> list[dict[str, Any]]:
        """Records of every request answered 2xx, in arrival order."""
        return [record for request in self.requests if request.delivered
                for record in request.records]

    async def wait_for_requests(self, n: int, *, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Every request so far, once at least ``n`` arrived (answered or not)."""
        await self._wait_until(lambda: len(self.requests) >= n, timeout)
        return list(self.requests)

    async def wait_for_records(self, n: int, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """:attr:`delivered_records`, once there are at least ``n``."""
        await self._wait_until(lambda: len(self.delivered_records) >= n, timeout)
        return self.delivered_records

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the handler ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        received = ReceivedRequest(method=request.method, path=request.path,
                                   headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                                   body=body, remote_port=peer[1] if peer else None, records=[])
        try:
            received.records = parse_records(request.content_type, body)
        except (ValueError, UnicodeDecodeError) as exc:
            received.parse_error = f"{type(exc).__name__}: {exc}"
        reply = self._replies.popleft() if self._replies else self.default_reply
        self.requests.append(received)
        self._notify()

        await self._open.wait()
        if self._going_away:
            # Shutting down while this request was held: drop it unanswered, like a dying server.
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable()

        received.status = reply.status
        self._notify()
        return web.Response(status=reply.status, headers=dict(reply.headers), body=reply.body)


def verify_signature(request: ReceivedRequest, secret: str, *,
                     tolerance: float = 300.0, now: float | None = None) -> bool:
    """True if ``request`` carries a valid Standard Webhooks ``v1`` signature for ``secret``.

    Follows the spec on its own (no amid code): the key is the base64-decoded part after
    ``whsec_`` (or the secret's UTF-8 bytes otherwise); the signed content is
    ``{webhook-id}.{webhook-timestamp}.{raw body}``; any one of the space-separated ``v1,``
    signatures may match; the timestamp must be within ``tolerance`` seconds of now.
    """
    try:
        message_id = request.headers["webhook-id"]
        timestamp = request.headers["webhook-timestamp"]
        signatures = request.headers["webhook-signature"].split(" ")
    except KeyError:
        return False
    now = time.time() if now is None else now
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    key = (base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_")
           else secret.encode())
    expected = base64.b64encode(hmac.digest(
        key, f"{message_id}.{timestamp}.".encode() + request.body, "sha256"))
    return any(version == "v1" and hmac.compare_digest(signature.encode(), expected)
               for version, _, signature in (item.partition(",") for item in signatures))

