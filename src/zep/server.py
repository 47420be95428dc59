"""Listeners and per-connection lifecycle: accept, limit, drive, drain, shut down.

This is the only place that owns client sockets before a driver takes them: each accepted
connection gets an exchange for its protocol and either a `FastConnection` (zep.fastpath: loop
callbacks, no task; the default) or one `Driver` running in one task. A fast connection that
leaves the common path hands itself over to a driver, which the server then runs in a task.
With the compiled relay, a SOCKS5 connection goes to the engine first (`NativeSocks`, see
zep.nativepath), which gives it back to a fast connection when it leaves the engine's path.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property

from zep.accesslog import AccessRecord
from zep.auth import Credentials
from zep import fdlimit, relay as relay_choice
from zep.config import ENVIRONMENT, FLAGS, Settings
from zep.driver import Driver
from zep.exchange import CLIENT, HTTP_KEEP_ALIVE, HTTP_REQUEST, SERVER, TUNNEL, Command, Exchange, authority
from zep.fastpath import FastConnection
from zep.nativepath import EngineFront, NativeSocks, why_not_native
from zep.outcome import Outcome
from zep.relay_result import PairHandle, RelayResult, RelayUnavailable
from zep.routing import Router
from zep.throttle import LoginThrottle, source_of

log = logging.getLogger("zep.server")

RelayFunction = Callable[..., Awaitable[RelayResult]]

ACCEPT_RETRY = 0.1  # seconds between accept attempts while out of fds or buffers


@dataclass(frozen=True)
class Context:
    """What every connection needs, shared by all of them."""

    settings: Settings
    router: Router
    relay: RelayFunction
    credentials: Credentials | None
    relay_ready: Callable[[], bool] = relay_choice.ready  # checked before a client is told its tunnel is up
    logins: LoginThrottle = field(default_factory=LoginThrottle)
    start_pair: Callable[..., PairHandle] = relay_choice.start_pair  # the fast path's relay
    start_socks: Callable[..., PairHandle] | None = relay_choice.start_socks  # SOCKS5 in the engine, if compiled

    @cached_property
    def timeouts(self) -> dict[str, float]:
        """Seconds for each named timeout the driver applies (see zep.exchange; `connect` is the router's)."""
        s = self.settings
        return {HTTP_REQUEST: s.http_request_timeout, HTTP_KEEP_ALIVE: s.http_keep_alive_timeout,
                CLIENT: s.client_timeout, SERVER: s.server_timeout, TUNNEL: s.tunnel_timeout}


ExchangeFactory = Callable[[Context], Exchange]
DriverFactory = Callable[[Context, socket.socket, AccessRecord, Exchange], Driver]


@dataclass
class Listener:
    proto: str  # "socks5" or "http"
    sock: socket.socket
    exchange: ExchangeFactory
    refusal: bytes  # what a connection over the limit is told before it is closed
    paused: bool = False  # accepts failed (out of fds) and are retried until the backlog drains
    accepted: int = 0
    driver: DriverFactory = Driver
    engine: EngineFront | None = None  # SOCKS5 handshakes go to the relay engine (zep.nativepath)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port


class ProxyServer:
    def __init__(self, ctx: Context, *, reuse_port: bool = False) -> None:
        self.ctx = ctx
        self.reuse_port = reuse_port  # worker processes share each port (see bind_socket)
        self.listeners: list[Listener] = []
        self._connections: dict[asyncio.Task[None], Driver] = {}
        self._fast: set[FastConnection | NativeSocks] = set()
        self._all_closed: asyncio.Future[None] | None = None  # while draining or shutting down
        self._stopped = False
        self._draining = False
        # 0 (the default): as many as the open-files limit carries, as `zep serve` works out at start.
        self.max_connections = ctx.settings.max_connections or fdlimit.max_connections_for(
            fdlimit.current_limit(), ctx.settings.ziti_configured)
        self._other_sources: list[Callable[[], None]] = []  # how to close them (a tenant's hand-off socket)

    @property
    def open_connections(self) -> int:
        return len(self._connections) + len(self._fast)

    @property
    def draining(self) -> bool:
        return self._draining

    def accepted_by_listener(self) -> dict[str, int]:
        return {listener.proto: listener.accepted for listener in self.listeners}

    def tunnels_open(self) -> int:
        return (sum(driver.relaying for driver in self._connections.values())
                + sum(fast.relaying for fast in self._fast))

    def listen(self, proto: str, port: int, exchange: ExchangeFactory, refusal: bytes = b"",
               driver: DriverFactory = Driver) -> Listener:
        sock = bind_socket(self.ctx.settings.proxy_host, port, PORT_SETTINGS[proto], reuse_port=self.reuse_port)
        listener = Listener(proto, sock, exchange, refusal, driver=driver)
        self.listeners.append(listener)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_all, listener)
        log.info("listening: %s on %s", proto, format_address(listener.address))
        if proto == "socks5" and driver is Driver:
            why = why_not_native(self.ctx)
            if why is None:
                assert relay_choice.Verdicts is not None  # the compiled relay has both
                listener.engine = EngineFront.of(self.ctx, relay_choice.Verdicts())
            log.info("socks5 handshakes: %s", "in the relay engine" if why is None else f"in Python: {why}")
        return listener

    def _accept_all(self, listener: Listener) -> None:
        # Connections start once the backlog is taken, as tasks do: on the Python paths what runs
        # out first when descriptors run out is accept (which pauses), not the dials of the ones
        # accepted. (The engine dials a destination it remembers on its own thread meanwhile.)
        accepted: list[Callable[[], None]] = []
        try:
            self._accept_backlog(listener, accepted)
        finally:
            for start in accepted:
                start()

    def _accept_backlog(self, listener: Listener, accepted: list[Callable[[], None]]) -> None:
        loop = asyncio.get_running_loop()
        family = listener.sock.family
        while True:
            try:
                # The fd alone (what socket.accept() wraps): a connection the engine takes needs no
                # socket object, and the engine makes it non-blocking and sets TCP_NODELAY itself.
                fd, peer = listener.sock._accept()
            except (BlockingIOError, InterruptedError):
                if listener.paused:  # the backlog is empty and there were fds for all of it
                    listener.paused = False
                    log.info("accepting again on %s", listener.proto)
                return
            except OSError as exc:
                # Out of fds or buffers: stop accepting for a moment rather than spin on a readable socket.
                loop.remove_reader(listener.sock.fileno())
                loop.call_later(ACCEPT_RETRY, self._resume_accepting, listener)
                if not listener.paused:  # one line per episode, not one per retry
                    log.warning("accept on %s failed: %s; pausing accepts until connections close (retrying "
                                "every %g s)", listener.proto, exc.strerror or exc, ACCEPT_RETRY)
                listener.paused = True
                return
            listener.accepted += 1
            if self.open_connections >= self.max_connections:
                self._refuse(listener, socket.socket(family, socket.SOCK_STREAM, fileno=fd), peer)
                continue
            record = AccessRecord(format_address(peer), listener.proto)
            logins = self.ctx.logins
            # A source whose answers the throttle delays gets them from the fast path, which delays them.
            if listener.engine is not None and not (logins and logins.delay(source_of(record.client))):
                native = NativeSocks(self.ctx, listener.engine, record, listener.exchange, self)
                self._fast.add(native)
                accepted.append(functools.partial(self._start_native, native, fd, loop, listener))
                continue
            conn = client_socket(family, fd)
            if self.ctx.settings.fast_path and listener.driver is Driver:
                fast = self._fast_connection(listener, conn, record)
                self._fast.add(fast)
                accepted.append(fast.start)
            else:
                self.serve_connection(listener.driver(self.ctx, conn, record, listener.exchange(self.ctx)))

    def serve_connection(self, driver: Driver, commands: list[Command] | None = None) -> None:
        """Run a connection's driver (from `commands` on, when the fast path hands over) until it
        ends; drained and shut down with the others."""
        task = asyncio.get_running_loop().create_task(driver.run(commands))
        self._connections[task] = driver
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        del self._connections[task]
        self._closed_one()

    # What a FastConnection tells the server (zep.fastpath.Registry).
    def finished(self, conn: FastConnection) -> None:
        self._fast.discard(conn)
        self._closed_one()

    def hand_over(self, conn: FastConnection, driver: Driver, commands: list[Command]) -> None:
        self._fast.discard(conn)
        self.serve_connection(driver, commands)

    def replaced(self, old: NativeSocks, new: FastConnection) -> None:
        self._fast.discard(old)
        self._fast.add(new)

    def _start_native(self, native: NativeSocks, fd: int, loop: asyncio.AbstractEventLoop, listener: Listener) -> None:
        try:
            native.start(fd, loop)
        except RelayUnavailable:  # the engine is not running: the fast path tells the client, as without it
            fast = self._fast_connection(listener, client_socket(listener.sock.family, fd), native.record)
            self.replaced(native, fast)
            fast.start()

    def _fast_connection(self, listener: Listener, conn: socket.socket, record: AccessRecord) -> FastConnection:
        return FastConnection(self.ctx, conn, record, listener.exchange(self.ctx), self)

    def _closed_one(self) -> None:
        if self._all_closed is not None and not self.open_connections and not self._all_closed.done():
            self._all_closed.set_result(None)

    def _resume_accepting(self, listener: Listener) -> None:
        if not self._stopped:
            asyncio.get_running_loop().add_reader(listener.sock.fileno(), self._accept_all, listener)
            self._accept_all(listener)  # at once: an empty backlog ends the pause too

    def _refuse(self, listener: Listener, conn: socket.socket, peer: tuple) -> None:
        limit = self.max_connections
        try:
            conn.setblocking(False)
            conn.send(listener.refusal)
        except OSError:
            pass
        finally:
            conn.close()
        record = AccessRecord(format_address(peer), listener.proto, outcome=Outcome.REFUSED)
        record.detail = f"maxconn {limit} reached"
        record.emit()

    def stop_accepting(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        for close in self._other_sources:
            close()

    def add_source(self, close: Callable[[], None]) -> None:
        """Connections also come from elsewhere (serve_connection); `close` stops them with the listeners."""
        self._other_sources.append(close)

    async def drain(self, timeout: float) -> None:
        """Stop accepting at once; let tunnels and requests in flight finish within `timeout`
        seconds (a kept-alive HTTP connection is closed between requests, the next response says
        `Connection: close`), then cancel what is left, each logged `cancelled` with its counts."""
        self.stop_accepting()
        self._draining = True
        for driver in list(self._connections.values()):
            driver.drain()
        for fast in list(self._fast):
            fast.drain()
        try:
            await asyncio.wait_for(self._until_all_closed(), timeout)
        except TimeoutError:
            pass
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting at once, then cancel every connection and wait until each has logged."""
        self.stop_accepting()
        while self.open_connections:
            for task in list(self._connections):
                task.cancel()
            for fast in list(self._fast):
                fast.cancel()
            await self._until_all_closed()

    async def _until_all_closed(self) -> None:
        if not self.open_connections:
            return
        if self._all_closed is None or self._all_closed.done():
            self._all_closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._all_closed)


PORT_SETTINGS = {"socks5": "socks_port", "http": "http_port"}  # the setting a listener's error names


def bind_socket(host: str, port: int, setting: str, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A non-blocking TCP socket bound to (host, port), listening unless `listen` is false; the
    error when the port is taken says which setting to change.

    `reuse_port`: SO_REUSEPORT, so that the listeners of several worker processes share the port and
    the kernel spreads new connections over them. A socket that is bound but not listening holds
    the port without joining that group (Linux adds a socket to it in listen()), so it is never
    given a connection: that is how the supervisor reserves ports for its workers.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        if listen:
            sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = (f"address in use: set {ENVIRONMENT[setting]}/{FLAGS[setting]} to another port, "
                      "or to 0 for any free one")
        raise OSError(exc.errno, f"cannot listen on {format_address(address)}: {reason}") from None
    return sock


def client_socket(family: int, fd: int) -> socket.socket:
    """The socket object of an accepted connection, as zep serves it: non-blocking, TCP_NODELAY."""
    conn = socket.socket(family, socket.SOCK_STREAM, fileno=fd)
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def format_address(address: tuple) -> str:
    return authority(address[0], address[1])


