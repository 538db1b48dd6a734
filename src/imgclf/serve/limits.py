"""Request limits that act before any work is done: body size and requests in flight.

Both are pure ASGI middleware, so a refusal costs no routing, parsing or validation: under
overload the 503s stay fast and the event loop stays free for `/health`.

`BodySizeLimit` is pure ASGI, so it sees the body as it arrives: a declared Content-Length over
the limit is refused before a byte is read, and a chunked body (no Content-Length) is counted as
its chunks arrive and refused as soon as the count passes the limit, so no more than one chunk
past the limit is ever held in memory.

A refused body is drained, so that every client reads the 413. A server that answers and closes
while the client is still sending makes the kernel reset the connection, and a client that sends its
whole body before reading (Python's urllib and so `requests`) then sees "connection reset by peer"
instead of the answer; curl reads early and got it. So the 413 is sent at once, then the rest of the
body is read and thrown away, as nginx's lingering close does, up to a bound (`DRAIN_BYTES`,
`DRAIN_SECONDS`, and `DRAIN_IDLE_SECONDS` without data), and only then is the connection closed. A
client that asked `Expect: 100-continue` has not sent its body and is not invited to.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# How much of a refused body is read and dropped so the client can read the 413 (nginx's lingering
# close: lingering_time 30 s, lingering_timeout 5 s). Reading is all it costs: nothing is kept.
DRAIN_BYTES = 256 * 2**20  # bytes past which the connection is closed anyway
DRAIN_SECONDS = 30.0  # at most this long in all
DRAIN_IDLE_SECONDS = 5.0  # stop when the client sends nothing for this long


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit."""


def json_error_body(status: int, error: str, **extra: Any) -> bytes:
    return json.dumps({"error": error, "status": status, **extra}).encode()


async def send_json_error(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]] | None = None,
                          *, drain: Receive | None = None, **extra: Any) -> None:
    """Answer a JSON error and close the connection; with `drain`, read away the request body first.

    The response is complete on the wire before the draining starts (its Content-Length is sent and
    only the final, empty ASGI body message waits), so a client reading early has it at once.
    """
    body = json_error_body(status, error, **extra)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    # Ask the client to close: the rest of its (refused) body is not wanted.
    raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers + (headers or [])})
    await send({"type": "http.response.body", "body": body, "more_body": drain is not None})
    if drain is not None:
        await drain_body(drain)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def drain_body(receive: Receive, *, max_bytes: int = DRAIN_BYTES, seconds: float = DRAIN_SECONDS,
                     idle_seconds: float = DRAIN_IDLE_SECONDS) -> int:
    """Read and drop the rest of a request body, within the bounds; returns the bytes dropped.

    Example:
        >>> await drain_body(receive)  # doctest: +SKIP
        48234496
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    dropped = 0
    while dropped < max_bytes and (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=min(idle_seconds, left))
        except asyncio.TimeoutError:
            break
        if message["type"] != "http.request":  # the client went away
            break
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return dropped


def _may_drain(scope: Scope, declared: int | None) -> bool:
    """Drain unless the client waits for 100 Continue (its body is not on the way) or declared more
    than the bound (reading it would take too long; that client may see the connection reset)."""
    expect = dict(scope.get("headers") or []).get(b"expect", b"").lower()
    return expect != b"100-continue" and (declared is None or declared <= DRAIN_BYTES)


class BodySizeLimit:
    """ASGI middleware: 413 for any HTTP request whose body is over `max_bytes`.

    Example:
        >>> app.add_middleware(BodySizeLimit, max_bytes=16 * 2**20)  # doctest: +SKIP
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_json_error(send, 400, "invalid Content-Length header")
                return
            if too_big:
                drain = receive if _may_drain(scope, int(declared)) else None
                await send_json_error(send, 413, message, drain=drain, limit_bytes=self.max_bytes)
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:  # a handler answered before reading its body; nothing left to say
                return
            await send_json_error(send, 413, message, drain=receive if _may_drain(scope, None) else None,
                                  limit_bytes=self.max_bytes)


class Gate:
    """Counts requests in flight and refuses new ones over `limit` (no queue, so refusal is instant).

    Only the event-loop thread touches it, so a plain int is safe.

    Example:
        >>> gate = Gate(2)
        >>> gate.try_enter(), gate.try_enter(), gate.try_enter()
        (True, True, False)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refused = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


class ConcurrencyLimit:
    """ASGI middleware: requests to `paths` over the gate's limit get 503 with Retry-After at once.

    Example:
        >>> app.add_middleware(ConcurrencyLimit, gate=Gate(64), paths={"/predict"})  # doctest: +SKIP
    """

    def __init__(self, app: ASGIApp, *, gate: Gate, paths: set[str], retry_after_s: int = 1) -> None:
        self.app = app
        self.gate = gate
        self.paths = paths
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if not self.gate.try_enter():
            await send_json_error(send, 503, f"busy: {self.gate.limit} requests in flight",
                                  headers=[(b"retry-after", self.retry_after)], fix="retry after Retry-After seconds")
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()
