"""A SOCKS5 client connection: negotiate (sans-IO socks5), dial through the router, relay."""

from __future__ import annotations

import asyncio

from zep import socks5
from zep.dial import DialError
from zep.outcome import Outcome
from zep.server import Session, format_address

# Refusals that are about who the client is rather than what it sent.
_AUTH_REFUSALS = (b"\x05\xff", b"\x01\x01")


async def serve_socks5(session: Session) -> None:
    request = await _negotiate(session)
    if request is None:
        return
    record = session.record
    record.target = format_address((request.host, request.port))
    try:
        upstream = await session.ctx.router.connect(request.host, request.port)
    except DialError as exc:
        record.add_dial_failure(exc.failure, exc.detail)
        await session.send(socks5.connect_reply(exc.failure.socks_reply))
        return
    try:
        reply = socks5.connect_reply(socks5.SUCCEEDED, upstream.sock.getsockname())
    except OSError:
        upstream.sock.close()
        raise
    await session.open_tunnel(reply, upstream, request.early)


async def _negotiate(session: Session) -> socks5.ConnectRequest | None:
    """Run the handshake to a CONNECT request; None when it ended otherwise (recorded why)."""
    handshake = socks5.Socks5Handshake(session.ctx.credentials)
    record = session.record
    limit = session.ctx.settings.handshake_timeout
    try:
        async with asyncio.timeout(limit):
            while True:
                data = await session.recv()
                if not data:
                    record.outcome = Outcome.CLIENT_CLOSED
                    record.detail = "client closed during the SOCKS5 handshake"
                    return None
                for event in handshake.feed(data):
                    if isinstance(event, socks5.Send):
                        await session.send(event.data)
                    elif isinstance(event, socks5.Refuse):
                        record.outcome = Outcome.AUTH_FAILED if event.data in _AUTH_REFUSALS else Outcome.BAD_REQUEST
                        record.detail = event.reason
                        await session.send(event.data)
                        return None
                    else:
                        record.user = handshake.username or "-"
                        return event
    except TimeoutError:
        record.outcome = Outcome.REQUEST_TIMEOUT
        record.detail = f"no complete SOCKS5 request within {limit:g} s"
        return None
