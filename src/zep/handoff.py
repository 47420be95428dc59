"""Passing an accepted client connection from one zep process to another (SCM_RIGHTS).

The front process negotiates and authenticates; the tenant's worker dials and relays. One
`Handoff` travels as one datagram on a `SOCK_SEQPACKET` Unix socket: the client's file
descriptor as ancillary data, a small JSON header, and every byte the front has read from the
client. Datagrams keep each hand-off whole, so a worker never sees half of one.

Each tenant's worker listens on its own socket (`HandoffListener`) in a directory only zep's
user can enter; the front connects to it when it first needs it and again after it broke
(`WorkerLink`), so a restarted worker needs nobody's help to be found.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

log = logging.getLogger("zep.handoff")

_HEADER_LENGTH = struct.Struct("!I")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
# The largest hand-off: a request head at its limit plus what fits behind it in one read.
MAX_HANDOFF_BYTES = 256 * 1024
_BACKLOG = 16


class HandoffError(Exception):
    """The channel is closed or a datagram is not a hand-off."""


@dataclass(frozen=True)
class Handoff:
    tenant: str
    proto: str  # the listener that accepted it: "socks5" or "http"
    client: str  # the client's address, for the access log
    user: str  # the authenticated proxy user name
    password: str = field(default="", repr=False)  # the password the front accepted (for the worker's verifier)
    received: bytes = b""  # every byte the front read from the client, in order
    sent: bytes = b""  # what the front has sent to the client (the worker's replay regenerates it)


def encode(handoff: Handoff) -> bytes:
    header = asdict(handoff)
    del header["received"]
    header["sent"] = base64.b64encode(handoff.sent).decode("ascii")
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    message = _HEADER_LENGTH.pack(len(text)) + text + handoff.received
    if len(message) > MAX_HANDOFF_BYTES:
        raise HandoffError(f"hand-off of {len(message)} bytes is larger than {MAX_HANDOFF_BYTES}")
    return message


def decode(message: bytes) -> Handoff:
    try:
        (length,) = _HEADER_LENGTH.unpack_from(message)
        header = json.loads(message[_HEADER_LENGTH.size:_HEADER_LENGTH.size + length])
        header["sent"] = base64.b64decode(header["sent"], validate=True)
        return Handoff(received=message[_HEADER_LENGTH.size + length:], **header)
    except (struct.error, ValueError, TypeError, KeyError) as exc:
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
        except OSError as exc:  # EPIPE, ECONNRESET, ENOTCONN: the worker is gone
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


class HandoffListener:
    """A tenant's worker: takes hand-offs from the front on a listening socket at `path`."""

    def __init__(self, path: str, on_handoff: Callable[[socket.socket, Handoff], None]) -> None:
        self.path = path
        self._on_handoff = on_handoff
        self._sock: socket.socket | None = None
        self._channels: set[socket.socket] = set()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a worker before us, which died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(self.path)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                channel, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accepting the front's channel failed: %s", exc)
                return
            _pid, uid, _gid = _PEER_CREDENTIALS.unpack(
                channel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
            if uid != os.getuid():  # the directory should make this impossible; refuse all the same
                log.warning("refused a hand-off channel from user id %d", uid)
                channel.close()
                continue
            channel.setblocking(False)
            self._channels.add(channel)
            asyncio.get_running_loop().add_reader(channel.fileno(), self._read, channel)

    def _read(self, channel: socket.socket) -> None:
        while True:
            try:
                got = receive(channel)
            except HandoffError as exc:
                if "closed the channel" not in str(exc):
                    log.warning("dropped the front's channel: %s", exc)
                self._drop(channel)
                return
            if got is None:
                return
            self._on_handoff(*got)

    def _drop(self, channel: socket.socket) -> None:
        asyncio.get_running_loop().remove_reader(channel.fileno())
        self._channels.discard(channel)
        channel.close()

    def close(self) -> None:
        for channel in list(self._channels):
            self._drop(channel)
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class WorkerLink:
    """The front's way to one tenant's worker: connected when first needed, again after it broke."""

    def __init__(self, tenant: str, path: str) -> None:
        self.tenant = tenant
        self.path = path
        self._channel: socket.socket | None = None

    async def send(self, client: socket.socket, handoff: Handoff) -> None:
        """Hand `client` over (the caller still closes its own copy); HandoffError when the worker
        cannot be reached. A channel that broke since the last hand-off is replaced once."""
        fresh = self._channel is None
        channel = self._connected()
        try:
            await send(channel, client, handoff)
            return
        except HandoffError:
            self.close()
            if fresh:
                raise
        await send(self._connected(), client, handoff)

    def _connected(self) -> socket.socket:
        if self._channel is not None:
            return self._channel
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_HANDOFF_BYTES * 2)
        channel.setblocking(False)
        try:
            channel.connect(self.path)  # a local socket: done at once, or refused at once
        except OSError as exc:
            channel.close()
            reason = "it is not listening" if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)) else \
                (exc.strerror or str(exc))
            raise HandoffError(f"cannot reach the worker of tenant {self.tenant}: {reason}") from None
        self._channel = channel
        return channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
