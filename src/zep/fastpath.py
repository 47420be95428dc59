"""The fast path: a SOCKS5 or HTTP CONNECT connection from accept to relay on loop callbacks alone.

No task and no coroutine per connection: handshake bytes arrive through one reader callback and go
straight into the connection's exchange (the same sans-IO exchange the coroutine driver runs, so
the protocols exist once); an IP literal on a direct route is dialed with the loop's own
non-blocking connect; the relay gets both sockets through its callback interface. Every named
timeout is a timer handle (`loop.call_at`) cancelled on every way out, and every outcome is the one
`zep.driver.Driver` would log: where this module is not sure to do exactly what the driver does,
it does not try.

Anything off the common path goes to a coroutine `Driver`, which carries on from the command the
fast path stopped at, with the connection's state (`Driver.adopt`): a send the client's socket
does not take at once, a forwarded HTTP request, a lingering or aborting close, a timer that watches
the upstream. A destination that needs more than a connect (a name to resolve, a Ziti service, the
upstream proxy) is dialed by `Router.connect` in a task, the one task such a connection has.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Protocol

from zep.accesslog import AccessRecord
from zep.dial import DialError, Upstream, connect_failed, connect_timed_out
from zep.driver import RECV_SIZE, Driver, describe, replace_report, tunnel_outcome
from zep.exchange import (
    CLIENT,
    TIMERS,
    TUNNEL,
    Arm,
    Cancel,
    ClientData,
    ClientEof,
    ClientError,
    Close,
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
    TimerFired,
    Tunnel,
)
from zep.outcome import Outcome
from zep.relay_result import PairHandle, RelayResult, RelayUnavailable
from zep.throttle import source_of

if TYPE_CHECKING:
    from zep.server import Context

log = logging.getLogger("zep.driver")


class Registry(Protocol):
    """Who keeps count of connections (the server)."""

    def finished(self, conn: FastConnection) -> None:
        ...

    def hand_over(self, conn: FastConnection, driver: Driver, commands: list[Command]) -> None:
        """Run `driver.run(commands)` in a task: the connection is the driver's from now on."""
        ...


class _State(enum.Enum):
    READING = enum.auto()  # the exchange waits for the client
    DIALING = enum.auto()
    RELAYING = enum.auto()
    DONE = enum.auto()  # closed, or handed to a driver


_READING, _DIALING, _RELAYING, _DONE = _State.READING, _State.DIALING, _State.RELAYING, _State.DONE


class FastConnection:
    __slots__ = (
        "ctx", "exchange", "_loop", "_registry", "_sock", "_fd", "_record", "_logged", "_state", "_reading",
        "_eof", "_sent", "_timer_name", "_deadline", "_timer", "_timer_when", "_drain", "_upstream_sock",
        "_route", "_early_down", "_dial_task", "_dial_target", "_dial_started", "_relay", "_report", "_head_start",
    )

    def __init__(self, ctx: Context, sock: socket.socket, record: AccessRecord, exchange: Exchange,
                 registry: Registry) -> None:
        self.ctx = ctx
        self.exchange = exchange
        self._loop = asyncio.get_running_loop()
        self._registry = registry
        self._sock = sock
        self._fd = sock.fileno()
        self._record = record
        self._logged = False  # `_record` was emitted: a driver taking over starts a new one
        self._state = _READING
        self._reading = False  # our reader is registered
        self._eof = False
        self._sent = 0  # bytes sent to the client for the entry being built
        self._timer_name: str | None = None  # the armed timer (one that watches the client)
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = -1.0
        self._drain = False
        self._upstream_sock: socket.socket | None = None
        self._route = ""
        self._early_down = b""
        self._dial_task: asyncio.Task[Upstream] | None = None
        self._dial_target = ("", 0)
        self._dial_started = 0.0
        self._relay: PairHandle | None = None
        self._report: Report | None = None
        self._head_start = 0.0  # seconds the first armed timer has run already (resume())

    # ------------------------------------------------------------------------- what the server calls

    @property
    def relaying(self) -> bool:
        """A tunnel is being relayed (for the metrics)."""
        return self._state is _RELAYING

    def start(self) -> None:
        self._run(self.exchange.start())
        if self._state is _READING:
            self._readable()  # the greeting is often there already

    def resume(self, commands: list[Command], then: Event | None, *, elapsed: float, sent: int) -> None:
        """Carry on with a connection whose handshake began elsewhere (zep.nativepath): `commands`
        are this exchange's so far, `then` what happened next if the exchange still waits for the
        client, `elapsed` how long ago it was accepted (the http-request deadline counts from
        then), `sent` the bytes the client was sent already (they count in the entry)."""
        self._head_start = elapsed
        self._sent = sent
        try:
            self._run(commands)
        except Exception:
            return self._internal_error()
        if self._state is not _READING:
            return
        if then is None:
            self._readable()
        else:
            self._eof = type(then) is not TimerFired  # an EOF or an error ended the client's side
            self._handle(then)

    def drain(self) -> None:
        if self._state is _READING and not self._drain:
            self._handle(Drain())
        else:
            self._drain = True  # for the next wait, as the driver does

    def cancel(self) -> None:
        """zep stops now: log what the exchange had in hand (or the tunnel, once the relay has
        stopped) and close."""
        state = self._state
        if state is _RELAYING:
            if self._relay is not None:
                self._relay.cancel()  # the pair ends; _relayed logs it
            return
        if state is _DONE:
            return
        if state is _DIALING:
            self._abandon_dial()
        try:
            for command in self.exchange.handle(Cancel()):
                if type(command) is Log:
                    self._emit(command.report)
        finally:
            self._finish()

    # ------------------------------------------------------------------------- events and commands

    def _handle(self, event: Event) -> None:
        try:
            self._run(self.exchange.handle(event))
        except Exception:
            self._internal_error()

    def _run(self, commands: list[Command]) -> None:
        """Carry out commands in order as the driver would, then wait for what comes next."""
        for i, command in enumerate(commands):
            kind = type(command)
            if kind is SendClient:
                rest, failure = self._send(command.data)
                if rest or failure:
                    return self._hand_over(commands[i + 1:], pending=rest, failure=failure)
            elif kind is Arm:
                name = command.name
                if TIMERS[name][0] != "client":
                    return self._hand_over(commands[i:])
                self._timer_name = name
                self._deadline = self._loop.time() + self.ctx.timeouts[name] - self._head_start
                self._head_start = 0.0
            elif kind is Disarm:
                if self._timer_name == command.name:
                    self._timer_name = None
            elif kind is Log:
                self._emit(command.report)
            elif kind is Login:
                source = source_of(self._record.client)
                if self.ctx.logins.delay(source):
                    return self._hand_over(commands[i:])  # the driver holds the answer back
                self.ctx.logins.record(source, command.accepted)
            elif kind is Dial:
                return self._dial(command)  # what follows a Dial is never carried out (as in the driver)
            elif kind is Tunnel:
                return self._tunnel(command)
            elif kind is Close and not (command.linger or command.abort):
                return self._finish()
            else:  # SendUpstream, CloseUpstream, a lingering or aborting Close
                return self._hand_over(commands[i:])
        self._wait()

    def _wait(self) -> None:
        """Wait for the client, within the armed timer; TimerFired once it has run out."""
        exchange = self.exchange
        if self._drain:
            self._drain = False
            return self._handle(Drain())
        if exchange.wants_upstream or not exchange.wants_client or self._eof or self._timer_name is None:
            return self._hand_over([])  # not the common path: the driver knows what to do
        self._state = _READING
        loop = self._loop
        when = self._deadline
        if loop.time() >= when:
            return self._handle(TimerFired(self._timer_name))
        if not self._reading:
            loop.add_reader(self._fd, self._readable)
            self._reading = True
        if when != self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._on_timer)
            self._timer_when = when

    def _readable(self) -> None:
        try:
            data = self._sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return self._wait()
        except OSError as exc:
            self._eof = True
            return self._handle(ClientError(describe(exc)))
        if not data:
            self._eof = True
            return self._handle(ClientEof())
        name = self._timer_name
        if name is not None and TIMERS[name][1]:
            self._deadline = self._loop.time() + self.ctx.timeouts[name]
        if self._logged:
            self._record = AccessRecord(self._record.client, self._record.proto)  # the next entry starts now
            self._logged = False
        self._handle(ClientData(data))

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = -1.0
        if self._state is _READING:
            self._wait()
        elif self._state is _DIALING:
            self._connect_timed_out()

    def _send(self, data: bytes) -> tuple[bytes, str]:
        """Send to the client: what its socket did not take, and the failure if it failed."""
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return data, ""
        except OSError as exc:
            return b"", describe(exc)
        self._sent += sent
        return data[sent:], ""

    # ------------------------------------------------------------------------- the dial

    def _dial(self, dial: Dial) -> None:
        self._state = _DIALING
        self._stop_reading()
        self._cancel_timer()  # the driver applies no client timer while it dials either
        host, port = dial.host, dial.port
        self._dial_target = (host, port)
        self._dial_started = time.monotonic()  # the dial's time goes to the entry (as Driver's timing_dial)
        router = self.ctx.router
        direct = router.direct_dialer(host, port)
        try:
            addresses = direct.literal_addresses(host, port) if direct is not None else None
        except DialError as exc:
            return self._dial_failed(exc)
        if addresses is None:
            self._dial_task = task = self._loop.create_task(router.connect(host, port))
            task.add_done_callback(self._dialed_by_router)
            return
        (family, address), = addresses
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            return self._dial_failed(connect_failed(exc, host, port))
        self._upstream_sock = sock
        sock.setblocking(False)
        try:
            err = sock.connect_ex(address)
        except OSError as exc:  # what connect_ex does not turn into an errno (an audit hook's refusal)
            self._close_upstream()
            return self._dial_failed(connect_failed(exc, host, port))
        if err == 0:
            return self._connected()
        if err != errno.EINPROGRESS:
            return self._connect_error(err)
        self._loop.add_writer(sock.fileno(), self._connect_done)
        self._timer = self._loop.call_later(router.connect_timeout, self._on_timer)

    def _connect_done(self) -> None:
        sock = self._upstream_sock
        self._loop.remove_writer(sock.fileno())
        self._cancel_timer()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self._connect_error(err)
        self._connected()

    def _connected(self) -> None:
        self._dialed()
        self._route = "direct"
        try:
            bound = self._upstream_sock.getsockname()
        except OSError:
            bound = None
        self._handle(Dialed("direct", bound))

    def _connect_error(self, err: int) -> None:
        self._close_upstream()
        self._dial_failed(connect_failed(OSError(err, os.strerror(err)), *self._dial_target))

    def _connect_timed_out(self) -> None:
        self._stop_dial()
        host, port = self._dial_target
        self._dial_failed(connect_timed_out(host, port, self.ctx.router.connect_timeout))

    def _dial_failed(self, exc: DialError) -> None:
        self._dialed()
        self._handle(DialFailed(exc.failure, exc.detail))

    def _dialed(self) -> None:
        self._record.dial_seconds += time.monotonic() - self._dial_started

    def _dialed_by_router(self, task: asyncio.Task[Upstream]) -> None:
        self._dial_task = None
        if task.cancelled():
            return  # we stopped waiting (cancel())
        self._dialed()
        exc = task.exception()
        if isinstance(exc, DialError):
            return self._handle(DialFailed(exc.failure, exc.detail))
        if exc is not None:
            return self._internal_error(exc)
        upstream = task.result()
        self._upstream_sock, self._route, self._early_down = upstream.sock, upstream.route, upstream.early_down
        try:
            bound = upstream.sock.getsockname()
        except OSError:
            bound = None
        self._handle(Dialed(upstream.route, bound))

    def _abandon_dial(self) -> None:
        self._dialed()
        self._stop_dial()

    def _stop_dial(self) -> None:
        if self._dial_task is not None:
            self._dial_task.cancel()
            self._dial_task = None
        elif self._upstream_sock is not None:
            self._loop.remove_writer(self._upstream_sock.fileno())
        self._cancel_timer()
        self._close_upstream()

    # ------------------------------------------------------------------------- the tunnel

    def _tunnel(self, tunnel: Tunnel) -> None:
        if not self.ctx.relay_ready():
            return self._hand_over([tunnel])  # the driver tells the client and logs why
        rest, failure = self._send(tunnel.reply)
        if rest or failure:
            return self._hand_over([replace_tunnel_reply(tunnel)], pending=rest, failure=failure)
        self._state = _RELAYING
        self._stop_reading()
        self._cancel_timer()
        self._sent = 0  # an entry for a tunnel counts what was relayed
        self._report = tunnel.report
        upstream, self._upstream_sock = self._upstream_sock, None
        try:
            handle = self.ctx.start_pair(self._sock, upstream, to_upstream=tunnel.early, to_client=self._early_down,
                                         idle_timeout=self.ctx.timeouts[TUNNEL], done=self._relayed)
        except RelayUnavailable as exc:  # zep's failure, not the client's (the relay closed both)
            self._emit(replace_report(tunnel.report, Outcome.INTERNAL_ERROR, str(exc)))
            return self._finish(relay_owns_client=True)
        except Exception as exc:
            return self._internal_error(exc, relay_owns_client=True)
        if self._state is _RELAYING:  # else the pair ended already
            self._relay = handle

    def _relayed(self, result: RelayResult) -> None:
        self._relay = None
        record, report = self._record, self._report
        record.up, record.down = result.bytes_up, result.bytes_down
        try:
            self._emit(replace_report(report, tunnel_outcome(report.route, result), result.error))
        except Exception:  # an observer failed: not the relay's business, whose callback this is
            log.exception("logging the tunnel of %s failed", record.client)
        finally:
            self._state = _DONE
            self._registry.finished(self)

    # ------------------------------------------------------------------------- endings

    def _emit(self, report: Report) -> None:
        record = self._record
        record.target, record.route, record.user = report.target, report.route, report.user
        record.outcome, record.detail = report.outcome, report.detail
        record.method, record.path, record.status = report.method, report.path, report.status
        record.down += self._sent
        self._sent = 0
        record.emit()
        self._logged = True

    def _hand_over(self, commands: list[Command], pending: bytes = b"", failure: str = "") -> None:
        self._state = _DONE
        self._stop_reading()
        self._cancel_timer()
        record = self._record
        if self._logged:
            record = AccessRecord(record.client, record.proto)
        driver = Driver(self.ctx, self._sock, record, self.exchange)
        upstream = None
        if self._upstream_sock is not None:
            upstream = Upstream(self._upstream_sock, self._route, self._early_down)
            self._upstream_sock = None
        driver.adopt(self._timer_name, self._deadline, self._sent, pending, failure, upstream, self._dial_target,
                     self._logged)
        if self._drain:
            driver.drain()
        self._registry.hand_over(self, driver, commands)

    def _internal_error(self, exc: BaseException | None = None, relay_owns_client: bool = False) -> None:
        """As the driver: a bug is logged with its traceback, and the entry says internal-error."""
        log.error("connection from %s failed", self._record.client, exc_info=exc or True)
        self._emit(Report(Outcome.INTERNAL_ERROR, detail="see the log"))
        self._finish(relay_owns_client=relay_owns_client)

    def _finish(self, relay_owns_client: bool = False) -> None:
        self._state = _DONE
        self._stop_reading()
        self._cancel_timer()
        self._close_upstream()
        if not relay_owns_client:
            self._sock.close()
        self._registry.finished(self)

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = -1.0

    def _close_upstream(self) -> None:
        sock, self._upstream_sock = self._upstream_sock, None
        if sock is not None:
            sock.close()



def replace_tunnel_reply(tunnel: Tunnel) -> Tunnel:
    """The Tunnel command for a driver taking over once its reply has been (partly) sent."""
    return Tunnel(b"", tunnel.refusal, tunnel.early, tunnel.report)
