"""Listeners and per-connection lifecycle: accept, limit, time out, hand over, shut down.

This is the only place that owns client sockets before the relay takes them. The protocol
sessions (socks_session, http_session) run one per accepted connection under a `Session`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zep.accesslog import AccessRecord
from zep.auth import Credentials
from zep.config import ENVIRONMENT, FLAGS, Settings
from zep.dial import Upstream
from zep.outcome import Outcome
from zep.relay_result import RelayCancelled, RelayResult, RelayUnavailable
from zep.routing import Router

log = logging.getLogger("zep.server")

RelayFunction = Callable[..., Awaitable[RelayResult]]


@dataclass(frozen=True)
class Context:
    """What every session needs, shared by all connections."""

    settings: Settings
    router: Router
    relay: RelayFunction
    credentials: Credentials | None


class Session:
    """One client connection: its socket (until handed to the relay) and its access record."""

    def __init__(self, ctx: Context, sock: socket.socket, record: AccessRecord) -> None:
        self.ctx = ctx
        self.sock = sock
        self.record = record
        self.loop = asyncio.get_running_loop()
        self._handed_over = False

    async def recv(self) -> bytes:
        return await recv_some(self.loop, self.sock)

    async def send(self, data: bytes) -> None:
        await send_all(self.loop, self.sock, data)

    async def open_tunnel(self, reply: bytes, upstream: Upstream, early: bytes) -> None:
        """Tell the client the tunnel is up, then relay until it ends (the relay owns both sockets)."""
        self.record.route = upstream.route
        try:
            await self.send(reply)
        except BaseException:
            upstream.sock.close()
            raise
        await self.relay(upstream.sock, upstream.route, to_upstream=early, to_client=upstream.early_down)

    async def relay(self, upstream: socket.socket, route: str, *, to_upstream: bytes = b"", to_client: bytes = b"") -> None:
        """Hand both sockets to the relay (which owns them from here) and record how it ended."""
        self._handed_over = True
        try:
            result = await self.ctx.relay(
                self.sock, upstream, to_upstream=to_upstream, to_client=to_client,
                idle_timeout=self.ctx.settings.idle_timeout,
            )
        except RelayCancelled as cancelled:
            self.record.add_relay(route, cancelled.result)
            raise
        self.record.add_relay(route, result)

    def close(self) -> None:
        if not self._handed_over:
            self.sock.close()


async def recv_some(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Up to 64 KiB; b"" at EOF. Tries the socket first: a client's next message is usually
    there already, and asking the loop to watch the socket costs two epoll_ctl calls."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return await loop.sock_recv(sock, 65536)


async def send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    """Send every byte, writing straight away when the socket has room (the usual case)."""
    try:
        sent = sock.send(data) if data else 0
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent < len(data):
        await loop.sock_sendall(sock, data[sent:])


SessionHandler = Callable[[Session], Awaitable[None]]


@dataclass
class Listener:
    proto: str  # "socks5" or "http"
    sock: socket.socket
    handler: SessionHandler
    refusal: bytes  # what a connection over the limit is told before it is closed

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port


class ProxyServer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.listeners: list[Listener] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def listen(self, proto: str, port: int, handler: SessionHandler, refusal: bytes = b"") -> Listener:
        sock = _bind(self.ctx.settings.proxy_host, port, _PORT_SETTINGS[proto])
        listener = Listener(proto, sock, handler, refusal)
        self.listeners.append(listener)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_all, listener)
        log.info("listening: %s on %s", proto, format_address(listener.address))
        return listener

    def _accept_all(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds or buffers: stop accepting for a moment rather than spin on a readable socket.
                log.warning("accept on %s failed: %s; pausing accepts for 0.1 s", listener.proto, exc)
                loop.remove_reader(listener.sock.fileno())
                loop.call_later(0.1, self._resume_accepting, listener)
                return
            if len(self._connections) >= self.ctx.settings.max_connections:
                self._refuse(listener, conn, peer)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._run_session(listener, conn, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _resume_accepting(self, listener: Listener) -> None:
        if not self._stopped.is_set():
            asyncio.get_running_loop().add_reader(listener.sock.fileno(), self._accept_all, listener)

    def _refuse(self, listener: Listener, conn: socket.socket, peer: tuple) -> None:
        limit = self.ctx.settings.max_connections
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

    async def _run_session(self, listener: Listener, conn: socket.socket, peer: tuple) -> None:
        record = AccessRecord(format_address(peer), listener.proto)
        session = Session(self.ctx, conn, record)
        try:
            await listener.handler(session)
        except asyncio.CancelledError:
            record.outcome = Outcome.CANCELLED
            raise
        except RelayUnavailable as exc:  # zep's failure, not the client's
            record.outcome = Outcome.INTERNAL_ERROR
            record.detail = str(exc)
        except OSError as exc:  # the client reset or broke the connection
            record.outcome = Outcome.CLIENT_ERROR
            record.detail = record.detail or str(exc) or type(exc).__name__
        except Exception:
            log.exception("session from %s failed", record.client)
            record.outcome = Outcome.INTERNAL_ERROR
        finally:
            session.close()
            record.emit()

    def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        self._stopped.set()

    async def shutdown(self) -> None:
        """Stop accepting at once, then cancel every connection and wait until each has logged."""
        self.stop_accepting()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


_PORT_SETTINGS = {"socks5": "socks_port", "http": "http_port"}


def _bind(host: str, port: int, setting: str) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
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


def format_address(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


