"""One driver per client connection: the only code that awaits.

It feeds its exchange events (bytes, EOF, errors, dial results, timers) and carries out the
commands that come back. It owns every wait: a side is read only while the exchange wants it,
every wait ends at the earliest armed timer, and a timer that runs out becomes TimerFired. So no
connection outlives its timeouts, whatever the exchange is doing.

Forwarded bytes stream with bounded memory: a side is not read while what was read from it is
still queued for the other side (`_Side.out`), and a queued send has its own inactivity timer
(`client` for the client, `server` for the upstream). A timer that watches a side the driver is
not reading for that reason is held back, so a client is never blamed for an upstream that
stopped reading, or the other way round.

The tunnel's outcome is decided here, where the relay's result is interpreted (`tunnel_outcome`).

Cheap on the common path: sockets are tried before the loop is asked to watch them, a timer is
rescheduled only when its deadline changes, and a dial runs in this task (no task per connection
beyond the one that runs the driver).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from zep.accesslog import AccessRecord
from zep.dial import DialError, Upstream
from zep.exchange import (
    CLIENT,
    SERVER,
    TIMERS,
    TUNNEL,
    Arm,
    Cancel,
    ClientData,
    ClientEof,
    ClientError,
    Close,
    CloseUpstream,
    Command,
    Dial,
    DialFailed,
    Dialed,
    Disarm,
    Drain,
    Event,
    Exchange,
    Log,
    Login,
    Report,
    SendClient,
    SendUpstream,
    TimerFired,
    Tunnel,
    UpstreamData,
    UpstreamEof,
    UpstreamError,
)
from zep.outcome import Outcome
from zep.relay_result import RelayCancelled, RelayEnd, RelayResult, RelayUnavailable
from zep.throttle import source_of

if TYPE_CHECKING:
    from zep.server import Context

log = logging.getLogger("zep.driver")

RECV_SIZE = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)
# What _execute returns when the connection is over (also a subclass's _dial that took the
# connection elsewhere: zep.front).
FINISHED = object()
_CLIENT_EOF, _UPSTREAM_EOF = ClientEof(), UpstreamEof()


class _Side:
    """One socket as the driver sees it: what is queued for it, a failed send, its timers."""

    __slots__ = ("sock", "fd", "early", "out", "eof", "failure", "timer", "deadline", "stall", "stall_timer",
                 "sent", "data_event", "eof_event", "error_event")

    def __init__(self, stall_timer: str, data_event: type, eof_event: Event, error_event: type) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.early = b""  # read from it already (with an upstream proxy's answer): its first data
        self.out: list[memoryview] = []  # queued for this side, oldest first
        self.eof = False  # reading it is over (EOF or an error)
        self.failure = ""  # a send failed: reported as the next event
        self.timer: str | None = None  # the armed timer that watches this side
        self.deadline = 0.0
        self.stall = 0.0  # the deadline of what is queued: `stall_timer` runs out then
        self.stall_timer = stall_timer
        self.sent = 0  # bytes sent to it for the entry being built
        self.data_event, self.eof_event, self.error_event = data_event, eof_event, error_event

    def attach(self, sock: socket.socket, early: bytes = b"") -> None:
        self.sock, self.fd, self.early = sock, sock.fileno(), early
        self.eof, self.failure = False, ""

    def detach(self) -> socket.socket | None:
        sock, self.sock, self.fd, self.early = self.sock, None, -1, b""
        self.out.clear()
        self.failure = ""
        return sock


class Driver:
    __slots__ = (
        "ctx", "exchange", "_loop", "_timeouts", "_record", "_client", "_upstream", "_waiter", "_timer",
        "_timer_when", "_wake_cb", "_timer_cb", "_drain_requested", "_held", "_ending", "_handed_over", "relaying",
        "_between_requests", "_destination", "_route",
    )

    def __init__(self, ctx: Context, sock: socket.socket, record: AccessRecord, exchange: Exchange) -> None:
        self.ctx = ctx
        self.exchange = exchange
        self._loop = asyncio.get_running_loop()
        self._timeouts = ctx.timeouts
        self._record = record  # the entry being built; replaced after each Log
        self._client = _Side(CLIENT, ClientData, _CLIENT_EOF, ClientError)
        self._client.attach(sock)
        self._upstream = _Side(SERVER, UpstreamData, _UPSTREAM_EOF, UpstreamError)
        self._destination: tuple[str, int] | None = None  # where the upstream connection goes
        self._route = "-"
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = -1.0
        self._wake_cb = self._wake
        self._timer_cb = self._on_timer
        self._drain_requested = False
        self._held: Report | None = None  # a Log waiting for the client's queue to drain
        self._ending = False  # a Tunnel or Close is being carried out: the exchange has no more to say
        self._handed_over = False  # the relay owns the sockets
        self.relaying = False  # a tunnel is being relayed (for the metrics)
        self._between_requests = False  # an entry was logged: the next one's clock starts with the next byte

    # ------------------------------------------------------------------------- the loop

    async def run(self, commands: list[Command] | None = None) -> None:
        """Drive the exchange from its start, or from `commands` when the fast path hands over."""
        try:
            if commands is None:
                commands = self.exchange.start()
            while True:
                result = await self._execute(commands)
                if result is FINISHED:
                    return
                event = result if result is not None else await self._next_event()
                commands = self.exchange.handle(event)
        except asyncio.CancelledError:
            self._emit_held(Outcome.CANCELLED, "zep stopped")
            if not self._ending:  # else what is left to log is the driver's own (a tunnel logs itself)
                for command in self.exchange.handle(Cancel()):
                    if isinstance(command, Log):
                        self._emit(command.report)
            raise
        except Exception:
            log.exception("connection from %s failed", self._record.client)
            self._emit(Report(Outcome.INTERNAL_ERROR, detail="see the log"))
        finally:
            self._release()

    def adopt(self, timer: str | None, deadline: float, client_sent: int, pending: bytes, failure: str,
              upstream: Upstream | None, destination: tuple[str, int], between_requests: bool) -> None:
        """Take over a connection the fast path began (zep.fastpath): the client's armed timer and
        its deadline, what was sent to the client for the entry being built, what is still to send
        or why a send failed, the upstream connection and where it goes."""
        client = self._client
        client.timer, client.deadline, client.sent, client.failure = timer, deadline, client_sent, failure
        if pending:
            client.out.append(memoryview(pending))
            client.stall = self._loop.time() + self._timeouts[CLIENT]
        if upstream is not None:
            self._upstream.attach(upstream.sock, upstream.early_down)
            self._destination, self._route = destination, upstream.route
        self._between_requests = between_requests

    def drain(self) -> None:
        """Tell the exchange zep is draining (at its next event)."""
        self._drain_requested = True
        self._wake()

    async def _execute(self, commands: list[Command]) -> object:
        """Carry out commands in order; returns an event to handle at once, FINISHED, or None."""
        for command in commands:
            kind = type(command)
            if kind is SendClient:
                self._queue(self._client, command.data)
            elif kind is SendUpstream:
                self._queue(self._upstream, command.data)
            elif kind is Arm:
                self._arm(command.name)
            elif kind is Disarm:
                self._disarm(command.name)
            elif kind is Log:
                if self._client.out:
                    self._held = command.report
                else:
                    self._emit(command.report)
            elif kind is Login:
                await self._login(command)
            elif kind is Dial:
                return await self._dial(command)
            elif kind is CloseUpstream:
                self._close_upstream()
            elif kind is Tunnel:
                await self._tunnel(command)
                return FINISHED
            elif kind is Close:
                await self._close(command)
                return FINISHED
            else:
                raise TypeError(f"unknown command {command!r}")
        return None

    async def _next_event(self) -> Event:
        exchange, client, upstream = self.exchange, self._client, self._upstream
        while True:
            if client.failure:
                reason, client.failure = client.failure, ""
                self._emit_held(Outcome.CLIENT_ERROR, reason)
                return ClientError(reason)
            if upstream.failure:
                reason, upstream.failure = upstream.failure, ""
                return UpstreamError(reason, sending=True)
            if self._drain_requested:
                self._drain_requested = False
                return Drain()
            if client.out:
                self._flush(client)
                if client.failure:
                    continue
                if not client.out and self._held is not None:
                    report, self._held = self._held, None
                    self._emit(report)
            if upstream.out:
                self._flush(upstream)
                if upstream.failure:
                    continue
            now = self._loop.time()
            # Backpressure: a side is not read while what it sends on is still queued (nor the
            # client while an entry waits for its response to be out).
            read_client = exchange.wants_client and not client.eof
            if read_client and (upstream.out or self._held is not None):
                read_client = False
                self._hold_back(client, now)
            read_upstream = exchange.wants_upstream and upstream.sock is not None and not upstream.eof
            if read_upstream and client.out:
                read_upstream = False
                self._hold_back(upstream, now)
            if read_client and (event := self._recv(client)) is not None:
                if self._between_requests:
                    self._between_requests = False
                    self._record.started = time.monotonic()
                return event
            if read_upstream and (event := self._recv(upstream)) is not None:
                return event
            name, when = self._earliest(read_client, read_upstream)
            if name is None:
                raise RuntimeError(f"{type(exchange).__name__} waits with no timer armed")
            if now >= when:
                for side in (client, upstream):
                    if name == side.stall_timer and side.out:
                        side.stall = now + self._timeouts[name]
                        if side is client:
                            self._emit_held(Outcome.CLIENT_TIMEOUT, "the client stopped reading (client timeout)")
                return TimerFired(name)
            await self._wait(read_client, read_upstream, when)

    def _earliest(self, read_client: bool, read_upstream: bool) -> tuple[str | None, float]:
        name, when = None, math.inf
        for side, reading in ((self._client, read_client), (self._upstream, read_upstream)):
            if reading and side.timer is not None and side.deadline < when:
                name, when = side.timer, side.deadline
            if side.out and side.stall < when:
                name, when = side.stall_timer, side.stall
        return name, when

    # ------------------------------------------------------------------------- waiting

    async def _wait(self, read_client: bool, read_upstream: bool, when: float) -> None:
        """Until a socket wanted is ready (read, or write for what is queued), or `when`."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        client, upstream, wake = self._client, self._upstream, self._wake_cb
        write_client, write_upstream = bool(client.out), bool(upstream.out)
        if read_client:
            loop.add_reader(client.fd, wake)
        if write_client:
            loop.add_writer(client.fd, wake)
        if read_upstream:
            loop.add_reader(upstream.fd, wake)
        if write_upstream:
            loop.add_writer(upstream.fd, wake)
        if when != self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._timer_cb)
            self._timer_when = when
        try:
            await waiter
        finally:
            self._waiter = None
            if read_client:
                loop.remove_reader(client.fd)
            if write_client:
                loop.remove_writer(client.fd)
            if read_upstream:
                loop.remove_reader(upstream.fd)
            if write_upstream:
                loop.remove_writer(upstream.fd)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = -1.0
        self._wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = -1.0

    # ------------------------------------------------------------------------- timers

    def _arm(self, name: str) -> None:
        side = self._client if TIMERS[name][0] == "client" else self._upstream
        side.timer, side.deadline = name, self._loop.time() + self._timeouts[name]

    def _disarm(self, name: str) -> None:
        for side in (self._client, self._upstream):
            if side.timer == name:
                side.timer = None

    def _hold_back(self, side: _Side, now: float) -> None:
        """zep is not waiting for a side it does not read: its timer counts from when it is read again."""
        if side.timer is not None:
            side.deadline = now + self._timeouts[side.timer]

    def _progress(self, side: _Side) -> None:
        """Bytes moved on a side: its inactivity timers start again."""
        now = self._loop.time()
        if side.timer is not None and TIMERS[side.timer][1]:
            side.deadline = now + self._timeouts[side.timer]
        side.stall = now + self._timeouts[side.stall_timer]

    # ------------------------------------------------------------------------- I/O

    def _recv(self, side: _Side) -> Event | None:
        if side.early:
            data, side.early = side.early, b""
            return side.data_event(data)
        try:
            data = side.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            side.eof = True
            return side.error_event(describe(exc))
        if not data:
            side.eof = True
            return side.eof_event
        self._progress(side)
        return side.data_event(data)

    def _queue(self, side: _Side, data: bytes) -> None:
        """Send now what the socket takes; queue the rest (its stall timer starts)."""
        if not data or side.sock is None or side.failure:
            return
        if side.out:
            side.out.append(memoryview(data))
            return
        sent = self._send(side, data)
        if sent < len(data) and not side.failure:
            side.stall = self._loop.time() + self._timeouts[side.stall_timer]
            side.out.append(memoryview(data)[sent:])

    def _flush(self, side: _Side) -> None:
        """Send what is queued, as far as the socket takes it."""
        out = side.out
        while out:
            chunk = out[0]
            sent = self._send(side, chunk)
            if side.failure:
                out.clear()
                return
            if sent < len(chunk):
                out[0] = chunk[sent:]
                return
            out.pop(0)

    def _send(self, side: _Side, data: bytes | memoryview) -> int:
        try:
            sent = side.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            side.failure = describe(exc)
            return 0
        side.sent += sent
        self._progress(side)
        return sent

    async def _login(self, login: Login) -> None:
        """Hold the answer to a password check while its source keeps failing (see zep.throttle)."""
        source = source_of(self._record.client)
        delay = self.ctx.logins.delay(source)
        if delay:
            await asyncio.sleep(delay)
        self.ctx.logins.record(source, login.accepted)

    async def _dial(self, dial: Dial) -> Event:
        side = self._upstream
        if not (dial.reuse and self._destination == (dial.host, dial.port) and _still_open(side)):
            self._close_upstream()
            try:
                with self._record.timing_dial():
                    upstream = await self.ctx.router.connect(dial.host, dial.port)  # within the connect timeout
            except DialError as exc:
                return DialFailed(exc.failure, exc.detail)
            side.attach(upstream.sock, upstream.early_down)
            self._destination, self._route = (dial.host, dial.port), upstream.route
        try:
            bound = side.sock.getsockname()
        except OSError:
            bound = None
        return Dialed(self._route, bound)

    def _close_upstream(self) -> None:
        sock = self._upstream.detach()
        self._destination = None
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------------------- endings

    async def _flush_client_fully(self) -> bool:
        """Wait until everything queued for the client is sent, within the client timeout."""
        client = self._client
        while client.out:
            self._flush(client)
            if client.failure or not client.out:
                break
            if self._loop.time() >= client.stall:
                return False
            await self._wait(False, False, client.stall)
        return not client.failure

    async def _tunnel(self, tunnel: Tunnel) -> None:
        report = tunnel.report
        self._ending = True
        ready = self.ctx.relay_ready()  # a client is never told its tunnel is up for a pair the relay refuses
        self._queue(self._client, tunnel.reply if ready else tunnel.refusal)
        try:
            flushed = await self._flush_client_fully()
        except asyncio.CancelledError:
            self._emit(replace_report(report, Outcome.CANCELLED, "zep stopped"))
            raise
        if not ready:
            self._emit(replace_report(report, Outcome.INTERNAL_ERROR, "the relay is not running: no tunnel can be relayed"))
            return
        if not flushed:
            self._emit(replace_report(report, Outcome.CLIENT_ERROR, self._client.failure or "client timeout"))
            return
        self._cancel_timer()
        early_down = self._upstream.early
        client, upstream = self._client.sock, self._upstream.detach()
        assert client is not None and upstream is not None
        self._handed_over = self.relaying = True
        self._client.sent = 0  # an entry for a tunnel counts what was relayed
        try:
            result = await self.ctx.relay(client, upstream, to_upstream=tunnel.early, to_client=early_down,
                                          idle_timeout=self._timeouts[TUNNEL])
        except RelayCancelled as cancelled:
            self._emit_tunnel(report, cancelled.result)
            raise
        except RelayUnavailable as exc:  # zep's failure, not the client's (the relay closed both)
            self._emit(replace_report(report, Outcome.INTERNAL_ERROR, str(exc)))
            return
        finally:
            self.relaying = False
        self._emit_tunnel(report, result)

    async def _close(self, close: Close) -> None:
        self._ending = True
        client = self._client
        if close.abort:
            client.out.clear()
            self._emit_held(Outcome.CLIENT_TIMEOUT, "the client stopped reading (client timeout)")
            _reset(client.sock)
            return
        if not await self._flush_client_fully():
            self._emit_held(Outcome.CLIENT_ERROR, client.failure or "client timeout")
            return
        if self._held is not None:
            report, self._held = self._held, None
            self._emit(report)
        if close.linger and not client.eof:
            await self._linger()

    async def _linger(self) -> None:
        """Shut down writing, then read and drop what the client still sends until it closes."""
        client = self._client
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        client.timer, client.deadline = CLIENT, self._loop.time() + self._timeouts[CLIENT]
        while not client.eof:
            if self._recv(client) is None:
                if self._loop.time() >= client.deadline:
                    return
                await self._wait(True, False, client.deadline)

    def _release(self) -> None:
        self._cancel_timer()
        self._close_upstream()
        if not self._handed_over:
            self._client.sock.close()

    # ------------------------------------------------------------------------- access entries

    def _emit(self, report: Report) -> None:
        record = self._record
        record.target, record.route, record.user = report.target, report.route, report.user
        record.outcome, record.detail = report.outcome, report.detail
        record.method, record.path, record.status = report.method, report.path, report.status
        record.up, record.down = record.up + self._upstream.sent, record.down + self._client.sent
        self._upstream.sent = self._client.sent = 0
        record.emit()
        self._record = AccessRecord(record.client, record.proto, tenant=record.tenant)
        self._between_requests = True

    def _emit_held(self, outcome: Outcome, detail: str) -> None:
        """The client failed before a held entry's bytes reached it: the entry says so."""
        if self._held is not None:
            report, self._held = self._held, None
            self._emit(replace_report(report, outcome, detail))

    def _emit_tunnel(self, report: Report, result: RelayResult) -> None:
        self._record.up, self._record.down = result.bytes_up, result.bytes_down
        self._upstream.sent = 0
        self._emit(replace_report(report, tunnel_outcome(report.route, result), result.error))


def _still_open(side: _Side) -> bool:
    """An idle upstream connection can carry a request: the server has not closed it (nor sent
    anything unasked, which no request could be matched with)."""
    if side.sock is None or side.eof or side.early:
        return False
    try:
        side.sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False


def _reset(sock: socket.socket) -> None:
    """Close with a reset, not a FIN: the peer must not take a cut response for a whole one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


def replace_report(report: Report, outcome: Outcome, detail: str) -> Report:
    return Report(outcome, report.target, report.route, report.user, detail, report.method, report.path,
                  report.status)


# How a relay's end reads in the access log: decided here, where the relay's result is interpreted.
_RELAY_OUTCOMES = {
    RelayEnd.DONE: Outcome.OK,
    RelayEnd.IDLE_TIMEOUT: Outcome.TUNNEL_TIMEOUT,
    RelayEnd.CLIENT_ERROR: Outcome.CLIENT_ERROR,
    RelayEnd.UPSTREAM_ERROR: Outcome.UPSTREAM_ERROR,
    RelayEnd.CANCELLED: Outcome.CANCELLED,
}


def tunnel_outcome(route: str, result: RelayResult) -> Outcome:
    """The Ziti SDK connects zep to its local bridge before the overlay dial has finished (see
    ziti.py), so on a Ziti route an upstream that fails before sending a single byte is the
    overlay dial failing: `ziti-dial-failed`, not an upstream error in the middle of a transfer.
    A client that resets after it has received the upstream's EOF had all there was: `ok`."""
    if route.startswith("ziti:") and result.ended is RelayEnd.UPSTREAM_ERROR and result.bytes_down == 0:
        return Outcome.ZITI_DIAL_FAILED
    if result.ended is RelayEnd.CLIENT_ERROR and result.download_finished:
        # The client had the whole download, upstream's EOF included, when it reset the
        # connection (npm, apt and others do): the exchange completed.
        return Outcome.OK
    return _RELAY_OUTCOMES[result.ended]


def describe(exc: OSError) -> str:
    """An errno name ("ECONNRESET") for the log, else the message."""
    if exc.errno:
        return errno.errorcode.get(exc.errno, os.strerror(exc.errno))
    return str(exc) or type(exc).__name__
