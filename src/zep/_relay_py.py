"""Pure-Python relay: each direction a small pump on the event loop's reader and writer callbacks.

Works on uvloop and on the default asyncio loop. A direction reads one chunk from its source,
sends it to its destination, and reads the next only once that chunk is out, so at most one chunk
per direction is held in memory and a side is never read faster than the other takes it (while the
destination is full, the source is not even watched). It counts what `send()` accepted, as the
compiled engine does, so a pair cut by a reset reports the bytes the socket took, not bytes that
were still waiting here. EOF from the source becomes `shutdown(SHUT_WR)` on the destination once
the chunk is out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections.abc import Callable

from zep.relay_result import RelayCancelled, RelayEnd, RelayResult

__all__ = ["relay", "start_pair", "start", "ready"]

CHUNK = 65536  # one read per direction; below malloc's mmap threshold, and freed once sent

_LINGER_RESET = struct.pack("ii", 1, 0)


def _error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else str(exc) or type(exc).__name__


class _Direction:
    """src -> dst. `pending[sent:]` is what was read and not yet sent."""

    def __init__(self, pair: _Pair, src: socket.socket, dst: socket.socket, early: bytes) -> None:
        self.pair = pair
        self.src = src
        self.dst = dst
        self.pending = early
        self.sent = 0
        self.bytes = 0  # accepted by dst's send(), early bytes included
        self.eof = False  # src said EOF
        self.shut = False  # EOF passed on
        self.reading = False  # a reader on src is registered
        self.writing = False  # a writer on dst is registered

    def pump(self) -> None:
        """Move what can move now; register for what has to wait."""
        pair = self.pair
        while not pair.ending:
            if self.sent < len(self.pending):
                try:
                    n = self.dst.send(memoryview(self.pending)[self.sent:])
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    pair.fail(self.dst, exc)
                    return
                self.sent += n
                self.bytes += n
                if n:
                    pair.last_activity = time.monotonic()
                if self.sent < len(self.pending):
                    self._watch(read=False, write=True)  # dst is full: stop reading src
                    return
                self.pending, self.sent = b"", 0
            if self.eof:
                self._watch(read=False, write=False)
                if not self.shut:
                    self.shut = True
                    with contextlib.suppress(OSError):  # a peer gone meanwhile shows on its own side
                        self.dst.shutdown(socket.SHUT_WR)
                    pair.maybe_done()
                return
            try:
                data = self.src.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                self._watch(read=True, write=False)
                return
            except OSError as exc:
                pair.fail(self.src, exc)
                return
            pair.last_activity = time.monotonic()
            if data:
                self.pending = data
            else:
                self.eof = True

    def _watch(self, *, read: bool, write: bool) -> None:
        loop = self.pair.loop
        if read != self.reading:
            self.reading = read
            if read:
                loop.add_reader(self.src.fileno(), self.pump)
            else:
                loop.remove_reader(self.src.fileno())
        if write != self.writing:
            self.writing = write
            if write:
                loop.add_writer(self.dst.fileno(), self.pump)
            else:
                loop.remove_writer(self.dst.fileno())


class _Pair:
    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, upstream: socket.socket,
                 to_upstream: bytes, to_client: bytes, idle_timeout: float | None,
                 done: Callable[[RelayResult], None] | None = None) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.up = _Direction(self, client, upstream, to_upstream)
        self.down = _Direction(self, upstream, client, to_client)
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.ending = False
        self.ended = RelayEnd.DONE
        self.error = ""
        self.t0 = time.monotonic()
        # relay() awaits `ended`; a start_pair() pair calls `done` instead
        self.ended_future: asyncio.Future[None] | None = loop.create_future() if done is None else None
        self.done = done

    def start(self) -> None:
        if self.idle_timeout is not None:
            self.timer = self.loop.call_later(self.idle_timeout, self.check_idle)
        self.up.pump()  # early bytes first, then whatever is there to read
        self.down.pump()

    def check_idle(self) -> None:
        self.timer = None
        assert self.idle_timeout is not None
        quiet = time.monotonic() - self.last_activity
        if quiet >= self.idle_timeout:
            self.finish(RelayEnd.IDLE_TIMEOUT)
        else:
            self.timer = self.loop.call_later(self.idle_timeout - quiet, self.check_idle)

    def maybe_done(self) -> None:
        if self.up.shut and self.down.shut:
            self.finish(RelayEnd.DONE)

    def fail(self, sock: socket.socket, exc: OSError) -> None:
        self.error = _error_name(exc)
        self.finish(RelayEnd.CLIENT_ERROR if sock is self.client else RelayEnd.UPSTREAM_ERROR)

    def finish(self, how: RelayEnd) -> None:
        """Unwatch and close both sockets: with FINs when both directions finished, else reset."""
        if self.ending:
            return
        self.ending = True
        self.ended = how
        if self.timer is not None:
            self.timer.cancel()
        for direction in (self.up, self.down):
            direction._watch(read=False, write=False)
        for sock in (self.client, self.upstream):
            if how is not RelayEnd.DONE:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        if self.done is not None:
            done, self.done = self.done, None
            done(self.result())
        elif not self.ended_future.done():
            self.ended_future.set_result(None)

    def result(self, ended: RelayEnd | None = None) -> RelayResult:
        ended = ended or self.ended
        failed = ended in (RelayEnd.CLIENT_ERROR, RelayEnd.UPSTREAM_ERROR)
        return RelayResult(self.up.bytes, self.down.bytes, time.monotonic() - self.t0, ended,
                           self.error if failed else "", download_finished=self.down.shut)

    def cancel(self) -> None:
        """start_pair()'s handle: end the pair now; `done` still gets the counts."""
        self.finish(RelayEnd.CANCELLED)


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
    pair = _Pair(asyncio.get_running_loop(), client, upstream, bytes(to_upstream), bytes(to_client), idle_timeout)
    try:
        client.setblocking(False)
        upstream.setblocking(False)
        pair.start()
        await asyncio.shield(pair.ended_future)
    except asyncio.CancelledError:
        pair.finish(RelayEnd.CANCELLED)
        raise RelayCancelled(pair.result(RelayEnd.CANCELLED)) from None
    except BaseException:
        pair.finish(RelayEnd.CANCELLED)  # cannot relay: both closed, with a reset
        raise
    return pair.result()


def start_pair(client: socket.socket, upstream: socket.socket, *, to_upstream: bytes = b"", to_client: bytes = b"",
               idle_timeout: float | None, done: Callable[[RelayResult], None]) -> _Pair:
    """Relay like relay(), without a coroutine: `done(RelayResult)` is called when the pair ends
    (cancelled too, perhaps before this returns). Returns the pair, whose cancel() ends it."""
    pair = _Pair(asyncio.get_running_loop(), client, upstream, bytes(to_upstream), bytes(to_client), idle_timeout,
                 done)
    try:
        client.setblocking(False)
        upstream.setblocking(False)
        pair.start()
    except BaseException:
        pair.finish(RelayEnd.CANCELLED)
        raise
    return pair
