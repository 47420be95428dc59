"""SOCKS5 from accept to relay in the compiled engine, Python asked only for the route.

The engine (`zep._relay.start_socks`) reads the greeting, the user/password login and a CONNECT
to an IP literal, and asks `NativeSocks` where to go; for a direct route that the egress policy
allows it connects, replies and relays on its own thread, and remembers the destination (`Verdicts`,
one table per router), so that the next request for it is dialed without asking. A connection
costs Python a call at accept, one for the route (the first time only) and one for the access
entry. Everything else is given back:
the client's socket returns with every byte it sent and every byte it was sent, a fresh exchange
replays them (zep.replay) and a `FastConnection` carries on from there as if it had had the
connection from the start. So the protocol and its answers exist once, in Python; the engine
takes only the path on which it says exactly what Python would.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from zep.accesslog import AccessRecord
from zep.auth import Credentials
from zep.dial import DialError, DirectDialer, connect_failed, connect_timed_out
from zep.driver import describe, tunnel_outcome
from zep.exchange import HTTP_REQUEST, TUNNEL, ClientEof, ClientError, Command, Dial, DialFailed, Event, Exchange, \
    TimerFired, authority
from zep.fastpath import FastConnection, Registry
from zep.outcome import Outcome
from zep.relay_result import PairHandle, RelayResult
from zep.replay import Replay
from zep.throttle import source_of

if TYPE_CHECKING:
    from zep.server import Context

log = logging.getLogger("zep.driver")

ROUTE = "direct"  # the only route the engine dials
FAMILIES = {1: socket.AF_INET, 4: socket.AF_INET6}  # SOCKS5 address type -> address family
MAX_CREDENTIAL = 255  # RFC 1929's limit on a user name or a password, in bytes


class GiveBack(enum.IntEnum):
    """Why the engine gave a handshake back (the GB_* values of zep._relay)."""

    PYTHON = 1  # off its path, or Python asked: the replayed exchange carries on
    EOF = 2
    ERROR = 3
    TIMEOUT = 4  # http-request
    CONNECT_FAILED = 5
    CONNECT_TIMEOUT = 6
    CANCELLED = 7


class NativeRegistry(Registry, Protocol):
    def replaced(self, old: NativeSocks, new: FastConnection) -> None:
        """`new` has the connection `old` had."""
        ...


def why_not_native(ctx: Context) -> str | None:
    """None when SOCKS5 handshakes can run in the engine, else why they run in Python."""
    settings = ctx.settings
    if not settings.fast_path:
        return "the fast path is off (ZEP_FAST_PATH)"
    if not settings.native_socks:
        return "ZEP_NATIVE_SOCKS is off"
    if ctx.start_socks is None:
        return "the compiled relay is not in use"
    if ctx.router.dialers:
        return "every destination is offered to the Ziti identities first"
    if not isinstance(ctx.router.fallback, DirectDialer):
        return "the fallback route is not direct"
    credentials = ctx.credentials
    if credentials is not None:
        if type(credentials) is not Credentials:
            return "logins are checked by a tenant's verifier"
        if any(len(utf8(v)) > MAX_CREDENTIAL for v in (credentials.username, credentials.password)):
            return "the user name or password is longer than SOCKS5 carries"
    return None


def utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class EngineFront:
    """What every connection of one listener gives the engine, worked out once."""

    start_socks: Callable[..., PairHandle]
    verdicts: object  # zep._relay.Verdicts: the destinations this router sent direct
    credentials: tuple[bytes, bytes] | None
    handshake_timeout: float
    connect_timeout: float
    idle_timeout: float

    @classmethod
    def of(cls, ctx: Context, verdicts: object) -> EngineFront:
        """For a context why_not_native() accepts."""
        credentials = ctx.credentials
        assert ctx.start_socks is not None
        return cls(ctx.start_socks, verdicts,
                   None if credentials is None else (utf8(credentials.username), utf8(credentials.password)),
                   ctx.timeouts[HTTP_REQUEST], ctx.router.connect_timeout, ctx.timeouts[TUNNEL])


class NativeSocks:
    """One SOCKS5 connection the engine has; `registry` is told when it ends or is replaced."""

    __slots__ = ("ctx", "_front", "_new_exchange", "_registry", "record", "_handle", "_host", "_port",
                 "_asked_to_connect", "_refused")

    def __init__(self, ctx: Context, front: EngineFront, record: AccessRecord,
                 new_exchange: Callable[[Context], Exchange], registry: NativeRegistry) -> None:
        self.ctx = ctx
        self._front = front
        self._new_exchange = new_exchange
        self._registry = registry
        self.record = record
        self._handle: PairHandle | None = None
        self._host = ""
        self._port = 0
        self._asked_to_connect = False
        self._refused: OSError | None = None  # the connect an audit hook refused (socket.connect's event)

    @property
    def relaying(self) -> bool:
        """Past the handshake: a tunnel (for the metrics)."""
        return self._handle is not None and self._handle.relaying

    def start(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        """Give the accepted client (its fd, owned by the engine from now on) to the engine."""
        front = self._front
        self._handle = front.start_socks(
            fd, credentials=front.credentials, handshake_timeout=front.handshake_timeout,
            connect_timeout=front.connect_timeout, idle_timeout=front.idle_timeout, request=self._route,
            done=self._relayed, given_back=self._given_back, verdicts=front.verdicts, loop=loop)

    def drain(self) -> None:
        """Nothing to do: a SOCKS5 handshake in progress may still finish within the drain timeout."""

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()  # a tunnel ends as cancelled; a handshake is given back and logged as such

    # ------------------------------------------------------------------------- the engine's calls

    def _route(self, atyp: int, address: bytes, port: int) -> None:
        """A CONNECT to an IP literal: connect there if it is a direct route the policy allows;
        anything else (a refusal included) is the fast path's to answer, from the same bytes. The
        engine waits for the answer: there is one, whatever happens here."""
        handle = self._handle
        assert handle is not None
        connect = False
        self._logged_in()
        try:
            family = FAMILIES[atyp]
            host = socket.inet_ntop(family, address)
            self._host, self._port = host, port
            connect = self._direct_and_allowed(host, port)
            if connect:
                self._asked_to_connect = True
                # The engine dials this destination again without asking: the answer depends on
                # it and zep's settings alone (a connect audit hook hears of the first dial only).
                handle.connect(family, address, port, remember=True)
        except Exception:
            log.exception("routing a native SOCKS5 request failed; the fast path takes it")
            self._asked_to_connect = connect = False
        if not connect:
            handle.give_back()

    def _direct_and_allowed(self, host: str, port: int) -> bool:
        direct = self.ctx.router.direct_dialer(host, port)
        try:
            addresses = direct.literal_addresses(host, port) if direct is not None else None
            if addresses:
                (_family, sockaddr), = addresses
                sys.audit("socket.connect", None, sockaddr)  # the event socket.connect() raises
        except DialError:
            return False
        except OSError as exc:  # an audit hook refused the connect: that is the dial's failure
            self._refused = exc
            return False
        return bool(addresses)

    def _logged_in(self) -> None:
        """The engine took a login (if one is asked for): that forgives the source's earlier failures."""
        logins = self.ctx.logins
        if logins and self.ctx.credentials is not None:
            logins.record(source_of(self.record.client), True)

    def _dialed_unasked(self) -> bool:
        """The engine dialed a destination it remembered: what the request was, learnt at the end."""
        assert self._handle is not None
        target = self._handle.target
        if target is None:
            return False
        atyp, address, self._port = target
        self._host = socket.inet_ntop(FAMILIES[atyp], address)
        self._asked_to_connect = True
        return True

    def _relayed(self, result: RelayResult) -> None:
        record = self.record
        record.up, record.down = result.bytes_up, result.bytes_down
        assert self._handle is not None
        record.dial_seconds += self._handle.dial_seconds
        try:
            if self._dialed_unasked():
                self._logged_in()
            if self._asked_to_connect:  # the entry Socks5Exchange reports for its tunnel
                credentials = self.ctx.credentials
                record.target, record.route = authority(self._host, self._port), ROUTE
                record.user = credentials.username if credentials is not None else "-"
                record.outcome, record.detail = tunnel_outcome(ROUTE, result), result.error
            else:  # the engine stopped during the handshake (zep stops)
                record.outcome, record.detail = Outcome.CANCELLED, "zep stopped"
            record.emit()
        except Exception:  # an observer failed: not the relay's business, whose callback this is
            log.exception("logging the tunnel of %s failed", record.client)
        finally:
            self._registry.finished(self)

    def _given_back(self, fd: int, received: bytes, sent: bytes, reason: int, err: int) -> None:
        """The fast path carries on with the client: its exchange replays what the engine read and
        said (the throttle hears of logins from the replay), then learns what happened next."""
        assert self._handle is not None
        record = self.record
        record.dial_seconds += self._handle.dial_seconds
        self._dialed_unasked()  # the replay's login tells the throttle itself
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return self._failed()
        try:
            sock.setblocking(False)
            exchange = Replay(self._new_exchange(self.ctx), received, sent, logins_counted=False)
            why = GiveBack(reason)
            commands = exchange.start()
            then: Event | None = None
            if why in (GiveBack.CONNECT_FAILED, GiveBack.CONNECT_TIMEOUT) or self._refused is not None:
                commands = self._dial_failed(exchange, commands, why, err)
            elif why is GiveBack.EOF:
                then = ClientEof()
            elif why is GiveBack.ERROR:
                then = ClientError(describe(OSError(err, os.strerror(err))))
            elif why is GiveBack.TIMEOUT:
                then = TimerFired(HTTP_REQUEST)
        except Exception:
            sock.close()
            return self._failed()
        fast = FastConnection(self.ctx, sock, record, exchange, self._registry)
        self._registry.replaced(self, fast)
        fast.resume(commands, then, elapsed=time.monotonic() - record.started, sent=len(sent))
        if why is GiveBack.CANCELLED:
            fast.cancel()

    def _failed(self) -> None:
        """As the driver: a bug is logged with its traceback, and the entry says internal-error."""
        log.error("connection from %s failed", self.record.client, exc_info=True)
        self.record.outcome, self.record.detail = Outcome.INTERNAL_ERROR, "see the log"
        self.record.emit()
        self._registry.finished(self)

    def _dial_failed(self, exchange: Exchange, commands: list[Command], why: GiveBack, err: int) -> list[Command]:
        """The replay ends where the exchange asked to dial: the engine's connect is that dial."""
        if not commands or type(commands[-1]) is not Dial:
            return commands  # the replay differs (it says so itself)
        if why is GiveBack.CONNECT_TIMEOUT:
            failure = connect_timed_out(self._host, self._port, self.ctx.router.connect_timeout)
        else:
            failure = connect_failed(self._refused or OSError(err, os.strerror(err)), self._host, self._port)
        return commands[:-1] + exchange.handle(DialFailed(failure.failure, failure.detail))
