"""Request limits that act before any work is done: body size and requests in flight.

Both are pure ASGI middleware, so a refusal costs no routing, parsing or validation: under
overload the 503s stay fast and the event loop stays free for `/health`.

`BodySizeLimit` is pure ASGI, so it sees the body as it arrives: a declared Content-Length over
the limit is refused before a byte is read, and a chunked body (no Content-Length) is counted as
its chunks arrive and refused as soon as the count passes the limit, so no more than one chunk
past the limit is ever held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit."""


def json_error_body(status: int, error: str, **extra: Any) -> bytes:
    return json.dumps({"error": error, "status": status, **extra}).encode()


async def send_json_error(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]] | None = None,
                          **extra: Any) -> None:
    body = json_error_body(status, error, **extra)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    # Ask the client to close: the rest of its (refused) body is never read.
    raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers + (headers or [])})
    await send({"type": "http.response.body", "body": body})


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
                await send_json_error(send, 413, message, limit_bytes=self.max_bytes)
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
            await send_json_error(send, 413, message, limit_bytes=self.max_bytes)


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
