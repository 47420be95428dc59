"""Pure-Python relay: two asyncio protocols wired back to back.

Works on uvloop and on the default asyncio loop. Each socket gets a transport
(``loop.connect_accepted_socket``); what one side reads is written to the other.
Flow control is the transports' own: when a side's write buffer goes above its
high-water mark, its protocol's ``pause_writing`` stops reading on the peer, and
``resume_writing`` starts it again, so at most one buffer's worth of data per
direction is held in memory. EOF on one side becomes ``write_eof`` (a
``shutdown(SHUT_WR)`` once the buffer drains) on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time

from zep.relay_result import RelayCancelled, RelayEnd, RelayResult

__all__ = ["relay", "start", "ready"]

# Per-direction write buffer limits. The high-water mark bounds what one
# direction holds in memory (plus one read, which the transport caps).
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)


def _error_text(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code:
        return errno.errorcode.get(code, str(code))
    return str(exc) or type(exc).__name__


class _Side(asyncio.Protocol):
    """One socket of the pair. ``peer`` is the side its data is written to."""

    def __init__(self, pair: _Pair, sock: socket.socket) -> None:
        self.pair = pair
        self.sock = sock
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.written = 0  # bytes handed to this side's transport
        self.eof = False  # this side sent EOF (we no longer read it)
        self.peer_full = False  # the peer's write buffer is above high water
        self.reading = True  # actual transport reading state
        self.lost = False
        self.closed_by_us = False
        self.uncounted = False
        self.early: list[bytes] = []  # read before the pair started (see data_received)
        self.connecting = False  # the loop is making our transport
        self.pending_close: bool | None = None  # close(reset=...) asked meanwhile

    def uncount_buffered(self) -> None:
        """Bytes still in the write buffer were never written: take them off once."""
        if self.uncounted or self.transport is None:
            return
        self.uncounted = True
        try:
            self.written -= self.transport.get_write_buffer_size()
        except Exception:  # pragma: no cover - transport already torn down
            pass

    # -- reading control -------------------------------------------------
    def update_reading(self) -> None:
        tr = self.transport
        if tr is None or self.lost or self.eof or tr.is_closing():
            return
        want = self.pair.started and not self.peer_full
        if want and not self.reading:
            self.reading = True
            tr.resume_reading()
        elif not want and self.reading:
            self.reading = False
            tr.pause_reading()

    # -- protocol callbacks ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connecting = False
        if self.pending_close is not None:
            self.close(reset=self.pending_close)
            return
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        self.update_reading()  # paused until both sides are ready
        self.pair.side_ready()

    def data_received(self, data: bytes) -> None:
        if not self.pair.started:
            # Some loops start reading right after connection_made even when it
            # paused the transport; keep this one read and pause for real now.
            self.early.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.reading = False
            return
        peer = self.peer
        if peer is None or peer.transport is None or peer.lost or peer.transport.is_closing():
            return
        self.pair.last_activity = time.monotonic()
        peer.written += len(data)
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.reading = False
        if not self.pair.started:
            return True  # passed on when the pair starts
        self.pair.last_activity = time.monotonic()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if not peer.transport.is_closing():
                peer.transport.write_eof()
        self.pair.maybe_done()
        return True  # keep the transport open: the other direction may go on

    def pause_writing(self) -> None:
        # Our buffer is full: stop reading from the side that fills it.
        peer = self.peer
        if peer is not None:
            peer.peer_full = True
            peer.update_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.peer_full = False
            peer.update_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.uncount_buffered()
        if exc is None and not self.closed_by_us and not self.pair.ending:
            # Closed under us without an error (should not happen with
            # eof_received returning True); treat as a broken pair.
            exc = ConnectionAbortedError(errno.ECONNABORTED, "connection closed")
        if exc is not None:
            self.pair.side_failed(self, exc)
        self.pair.side_lost()

    # -- teardown ----------------------------------------------------------
    def close(self, *, reset: bool = False) -> None:
        """Close after what is buffered is sent, or with reset=True drop it and reset the connection."""
        tr = self.transport
        if self.lost:
            return
        self.closed_by_us = True
        if tr is None and self.connecting:
            self.pending_close = reset  # done in connection_made
            return
        if reset:
            with contextlib.suppress(OSError):  # already closed by the loop
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if tr is None:
            # Never got a transport (creation failed): close the socket ourselves.
            self.lost = True
            self.sock.close()
            self.pair.side_lost()
        elif reset:
            self.uncount_buffered()
            tr.abort()
        else:
            tr.close()


class _Pair:
    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float | None) -> None:
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.started = False
        self.ending = False
        self.ready = 0
        self.lost = 0
        self.ended: RelayEnd | None = None
        self.error = ""
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.client: _Side
        self.upstream: _Side
        self.early_up = b""
        self.early_down = b""

    def side_ready(self) -> None:
        self.ready += 1
        if self.ready < 2 or self.ending:
            return
        self.started = True
        c, u = self.client, self.upstream
        # Early bytes first, before anything read from either socket.
        if self.early_up and not u.lost:
            u.written += len(self.early_up)
            u.transport.write(self.early_up)  # type: ignore[union-attr]
        if self.early_down and not c.lost:
            c.written += len(self.early_down)
            c.transport.write(self.early_down)  # type: ignore[union-attr]
        for side in (c, u):
            held, side.early = side.early, []
            for data in held:
                side.data_received(data)
        for side in (c, u):
            if side.eof:
                side.eof_received()
        c.update_reading()
        u.update_reading()
        if self.idle_timeout is not None:
            self.timer = self.loop.call_later(self.idle_timeout, self.check_idle)

    def check_idle(self) -> None:
        self.timer = None
        if self.ending:
            return
        assert self.idle_timeout is not None
        quiet = time.monotonic() - self.last_activity
        if quiet >= self.idle_timeout:
            self.finish(RelayEnd.IDLE_TIMEOUT, reset=True)
        else:
            self.timer = self.loop.call_later(self.idle_timeout - quiet, self.check_idle)

    def maybe_done(self) -> None:
        if self.client.eof and self.upstream.eof and not self.ending:
            # Both directions finished: close() flushes what is buffered first.
            self.finish(RelayEnd.DONE)

    def side_failed(self, side: _Side, exc: BaseException) -> None:
        # The first error decides, even while a clean end is still flushing.
        if self.ended is None or self.ended is RelayEnd.DONE:
            self.ended = RelayEnd.CLIENT_ERROR if side is self.client else RelayEnd.UPSTREAM_ERROR
            self.error = _error_text(exc)
        other = side.peer
        self.ending = True
        if other is not None:
            other.close(reset=True)

    def side_lost(self) -> None:
        self.lost += 1
        if self.lost >= 2:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if not self.done.done():
                self.done.set_result(None)

    def finish(self, how: RelayEnd, *, reset: bool = False) -> None:
        if self.ending:
            return
        self.ending = True
        self.ended = how
        self.client.close(reset=reset)
        self.upstream.close(reset=reset)


def start() -> None:
    """Nothing to start: each pair runs on the caller's event loop (start() exists by contract)."""


def ready() -> bool:
    return True


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    *,
    to_upstream: bytes = b"",
    to_client: bytes = b"",
    idle_timeout: float | None,
) -> RelayResult:
    """Relay bytes between two connected sockets until both directions end.

    Takes ownership of both sockets (they are closed when this returns or raises).
    """
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    pair = _Pair(loop, idle_timeout)
    c = _Side(pair, client)
    u = _Side(pair, upstream)
    c.peer, u.peer = u, c
    pair.client, pair.upstream = c, u
    pair.early_up, pair.early_down = bytes(to_upstream), bytes(to_client)

    def result(ended: RelayEnd | None = None) -> RelayResult:
        return RelayResult(
            bytes_up=max(u.written, 0),
            bytes_down=max(c.written, 0),
            seconds=time.monotonic() - t0,
            ended=ended or pair.ended or RelayEnd.DONE,
            error=pair.error if (ended or pair.ended) in (RelayEnd.CLIENT_ERROR, RelayEnd.UPSTREAM_ERROR) else "",
        )

    try:
        for side in (c, u):
            if side.lost:  # the other side already failed and closed this one
                continue
            side.sock.setblocking(False)
            side.connecting = True
            try:
                await loop.connect_accepted_socket(lambda side=side: side, sock=side.sock)
            finally:
                # On failure the loop has closed (or never took) the socket; a
                # later close() must not wait for a connection_made.
                side.connecting = False
        await asyncio.shield(pair.done)
    except asyncio.CancelledError:
        pair.ending = True
        if pair.timer is not None:
            pair.timer.cancel()
        c.close(reset=True)
        u.close(reset=True)
        raise RelayCancelled(result(RelayEnd.CANCELLED)) from None
    except BaseException:
        pair.ending = True
        c.close(reset=True)
        u.close(reset=True)
        raise
    return result()
