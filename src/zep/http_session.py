"""An HTTP proxy client connection: CONNECT tunnels and absolute-form forwarding with keep-alive.

Every request on a kept-alive connection is routed on its own: the upstream connection is
reused only while requests keep going to the same host and port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from zep import httpproxy
from zep.auth import parse_basic
from zep.dial import DialError, Upstream
from zep.outcome import Outcome
from zep.httpproxy import BadMessage, BodyChunk, MessageEnd, RequestHead, ResponseHead
from zep.server import Session, format_address, recv_some, send_all

log = logging.getLogger("zep.http")

PROXY_AUTHENTICATE = ("Proxy-Authenticate", 'Basic realm="zep"')
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# What a connection over the limit is told (see ProxyServer.listen).
OVERLOADED = httpproxy.error_response(503, body="zep: too many connections, try again later\n")

Event = TypeVar("Event")


class EventStream(Generic[Event]):
    """Events out of a sans-IO reader that is fed from a socket as they are needed."""

    def __init__(self, sock: socket.socket, feed: Callable[[bytes], list[Event]],
                 feed_eof: Callable[[], list[Event]] | None = None) -> None:
        self.sock = sock
        self._feed = feed
        self._feed_eof = feed_eof
        self._pending: deque[Event] = deque()
        self._eof = False
        self.bytes_read = 0

    async def next(self) -> Event | None:
        """The next event; None once the peer has closed and nothing is left."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self._eof:
                return None
            data = await recv_some(loop, self.sock)
            if data:
                self.bytes_read += len(data)
                self._pending.extend(self._feed(data))
            else:
                self._eof = True
                if self._feed_eof is not None:
                    self._pending.extend(self._feed_eof())
        return self._pending.popleft()


class UpstreamPool:
    """The one upstream connection a client connection holds, keyed by (host, port)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.current: Upstream | None = None
        self.key: tuple[str, int] | None = None

    async def get(self, host: str, port: int) -> Upstream:
        if self.current is not None and self.key == (host, port):
            return self.current
        self.drop()
        self.current = await self.session.ctx.router.connect(host, port)
        self.key = (host, port)
        return self.current

    def drop(self) -> None:
        if self.current is not None:
            self.current.sock.close()
        self.current = None
        self.key = None


async def serve_http(session: Session) -> None:
    settings = session.ctx.settings
    reader = httpproxy.RequestReader(settings.max_head_bytes)
    requests: EventStream[object] = EventStream(session.sock, reader.feed)
    upstreams = UpstreamPool(session)
    record = session.record
    wait = settings.handshake_timeout
    try:
        while True:
            try:
                async with asyncio.timeout(wait):
                    event = await requests.next()
            except TimeoutError:
                if record.target == "-":
                    record.outcome = Outcome.REQUEST_TIMEOUT
                    record.detail = f"no complete request within {wait:g} s"
                return
            if event is None:
                if record.target == "-":
                    record.outcome = Outcome.CLIENT_CLOSED
                    record.detail = "client closed before sending a request"
                return
            if isinstance(event, BadMessage):
                await _refuse(session, event.status, event.reason, Outcome.BAD_REQUEST)
                return
            assert isinstance(event, RequestHead), event
            record.target = format_address((event.host, event.port))
            if not await _authorized(session, event):
                return
            if event.method == "CONNECT":
                upstreams.drop()
                await _tunnel(session, event, reader.take_leftover())
                return
            if not await _forward(session, event, requests, upstreams):
                return
            record.outcome = Outcome.OK
            wait = settings.idle_timeout
    finally:
        upstreams.drop()


async def _authorized(session: Session, head: RequestHead) -> bool:
    credentials = session.ctx.credentials
    if credentials is None:
        return True
    given = parse_basic(head.proxy_authorization)
    if given is not None and credentials.matches(*given):
        session.record.user = given[0]
        return True
    reason = "no proxy credentials" if given is None else f"wrong proxy credentials for user {given[0]!r}"
    await _refuse(session, 407, reason, Outcome.AUTH_FAILED, headers=[PROXY_AUTHENTICATE])
    return False


async def _refuse(session: Session, status: int, reason: str, outcome: Outcome,
                  headers: Sequence[tuple[str, str]] = ()) -> None:
    session.record.outcome = outcome
    session.record.detail = reason
    await _send_error(session, status, reason, headers)


async def _send_error(session: Session, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
    await session.send(httpproxy.error_response(status, headers=headers, body=f"zep: {reason}\n"))


async def _dial(session: Session, host: str, port: int, dial: Callable) -> Upstream | None:
    """Dial through `dial`; on failure answer the client with the mapped status and return None."""
    try:
        upstream = await dial(host, port)
    except DialError as exc:
        session.record.add_dial_failure(exc.failure, exc.detail)
        await _send_error(session, exc.failure.http_status, exc.detail)
        return None
    session.record.route = upstream.route
    return upstream


async def _tunnel(session: Session, head: RequestHead, early: bytes) -> None:
    upstream = await _dial(session, head.host, head.port, session.ctx.router.connect)
    if upstream is not None:
        await session.open_tunnel(CONNECT_ESTABLISHED, upstream, early)


def _expects_continue(head: RequestHead) -> bool:
    has_body = head.chunked or bool(head.content_length)
    return has_body and head.version == "1.1" and any(
        name.lower() == b"expect" and value.strip().lower() == b"100-continue" for name, value in head.headers)


class _UpstreamSendFailed(Exception):
    pass


async def _forward(session: Session, head: RequestHead, requests: EventStream, upstreams: UpstreamPool) -> bool:
    """Forward one request and its response; True when the client connection stays open."""
    loop = asyncio.get_running_loop()
    record = session.record
    upstream = await _dial(session, head.host, head.port, upstreams.get)
    if upstream is None:
        return False

    async def to_upstream(data: bytes) -> None:
        try:
            await send_all(loop, upstream.sock, data)
        except OSError as exc:
            raise _UpstreamSendFailed(exc.strerror or str(exc)) from None
        record.up += len(data)

    if _expects_continue(head):
        # Like nginx, answer `Expect: 100-continue` here: the upstream's own interim answer would
        # only be read after the body, so clients would stall for their expect timeout (curl: 1 s).
        head = dataclasses.replace(head, headers=tuple(h for h in head.headers if h[0].lower() != b"expect"))
        await session.send(CONTINUE)
    try:
        await to_upstream(head.serialize())
        while True:
            event = await requests.next()
            if event is None:
                record.detail = "client closed in the middle of a request body"
                upstreams.drop()
                return False
            if isinstance(event, BadMessage):
                upstreams.drop()
                await _refuse(session, event.status, event.reason, Outcome.BAD_REQUEST)
                return False
            if isinstance(event, BodyChunk):
                await to_upstream(httpproxy.encode_body(event.data, head.chunked))
            elif isinstance(event, MessageEnd):
                await to_upstream(httpproxy.end_of_body(head.chunked))
                break
    except _UpstreamSendFailed as exc:
        upstreams.drop()
        await _refuse(session, 502, f"upstream {record.target} failed while receiving the request: {exc}", Outcome.UPSTREAM_ERROR)
        return False
    return await _relay_response(session, head, upstreams)


async def _relay_response(session: Session, head: RequestHead, upstreams: UpstreamPool) -> bool:
    """Copy the upstream's response to the client; True when both may keep their connections."""
    assert upstreams.current is not None
    record = session.record
    reader = httpproxy.ResponseReader(head.method, session.ctx.settings.max_head_bytes)
    responses: EventStream[object] = EventStream(upstreams.current.sock, reader.feed, reader.feed_eof)
    final: ResponseHead | None = None
    keep_alive = False
    while True:
        try:
            event = await responses.next()
        except OSError as exc:
            event = BadMessage(502, f"upstream {record.target} failed: {exc.strerror or exc}")
        if event is None:
            event = BadMessage(502, f"upstream {record.target} closed before a complete response")
        if isinstance(event, BadMessage):
            upstreams.drop()
            if final is None:
                await _refuse(session, 502, event.reason, Outcome.UPSTREAM_ERROR)
            else:  # the client has the head already: all that is left is to cut it short
                record.outcome = Outcome.UPSTREAM_ERROR
                record.detail = event.reason
            return False
        if isinstance(event, ResponseHead):
            if event.status >= 200:
                final = event
                keep_alive = head.keep_alive and not event.close_delimited
                data = event.serialize(keep_alive=keep_alive)
            else:
                data = event.serialize(keep_alive=True)
        elif isinstance(event, BodyChunk):
            assert final is not None
            data = httpproxy.encode_body(event.data, final.chunked)
        elif final is None:
            continue  # the end of an interim (1xx) response
        else:
            data = httpproxy.end_of_body(final.chunked)
        await session.send(data)
        record.down += len(data)
        if final is not None and isinstance(event, MessageEnd):
            break
    if not final.keep_alive:
        upstreams.drop()
    return keep_alive
