"""Passing an accepted client connection from one zep process to another (SCM_RIGHTS).

The front process negotiates and authenticates; the tenant's worker dials and relays. One
`Handoff` travels as one datagram on a `SOCK_SEQPACKET` Unix socket pair: the client's file
descriptor as ancillary data, and a small header plus the bytes the front has read from the
client but not consumed (the request, and what the client pipelined behind it). Datagrams
keep each hand-off whole, so a worker never sees half of one.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import asdict, dataclass

_HEADER_LENGTH = struct.Struct("!I")
# The largest hand-off: a request head at its limit plus what fits behind it in one read.
MAX_HANDOFF_BYTES = 256 * 1024


class HandoffError(Exception):
    """The channel is closed or a datagram is not a hand-off."""


@dataclass(frozen=True)
class Handoff:
    tenant: str
    proto: str  # the listener that accepted it: "socks5" or "http"
    client: str  # the client's address, for the access log
    user: str  # the authenticated proxy user name
    pending: bytes = b""  # client bytes the front read and did not consume, in order


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(front end, worker end), both non-blocking and close-on-exec unless inherited on purpose."""
    front, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (front, worker):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_HANDOFF_BYTES * 2)
        end.setblocking(False)
    return front, worker


def encode(handoff: Handoff) -> bytes:
    header = asdict(handoff)
    del header["pending"]
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    message = _HEADER_LENGTH.pack(len(text)) + text + handoff.pending
    if len(message) > MAX_HANDOFF_BYTES:
        raise HandoffError(f"hand-off of {len(message)} bytes is larger than {MAX_HANDOFF_BYTES}")
    return message


def decode(message: bytes) -> Handoff:
    try:
        (length,) = _HEADER_LENGTH.unpack_from(message)
        header = json.loads(message[_HEADER_LENGTH.size:_HEADER_LENGTH.size + length])
        return Handoff(pending=message[_HEADER_LENGTH.size + length:], **header)
    except (struct.error, ValueError, TypeError) as exc:
        raise HandoffError(f"not a hand-off: {exc}") from None


async def send(channel: socket.socket, client: socket.socket, handoff: Handoff) -> None:
    """Send the client's fd and the hand-off; the caller still owns (and then closes) `client`."""
    message = encode(handoff)
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(channel, [message], [client.fileno()])
            return
        except (BlockingIOError, InterruptedError):
            writable = loop.create_future()
            loop.add_writer(channel.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(channel.fileno())
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise HandoffError(f"the worker's channel is closed ({exc.strerror})") from None


def receive(channel: socket.socket) -> tuple[socket.socket, Handoff] | None:
    """One hand-off if one is waiting (None if not); the returned socket is non-blocking and ours.

    Raises HandoffError when the front has closed the channel or sent something else."""
    try:
        message, fds, flags, _address = socket.recv_fds(channel, MAX_HANDOFF_BYTES, 4)
    except (BlockingIOError, InterruptedError):
        return None
    sockets = [socket.socket(fileno=fd) for fd in fds]  # own every fd that arrived, even unexpected ones
    if not message and not fds:
        raise HandoffError("the front closed the channel")
    if len(sockets) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for sock in sockets:
            sock.close()
        raise HandoffError(f"a hand-off must carry exactly one connection, got {len(sockets)}")
    client = sockets[0]
    try:
        handoff = decode(message)
    except HandoffError:
        client.close()
        raise
    client.setblocking(False)
    return client, handoff
