"""The admin listener: liveness, readiness and Prometheus metrics over plain HTTP/1.1.

Off unless ZEP_ADMIN_ADDRESS / --admin names an address. It runs on zep's own event loop, so an
answer from /healthz means that loop is turning. One request per connection (`Connection: close`):
a malformed head gets 400, one larger than MAX_HEAD_BYTES 431, a method other than GET or HEAD
405, an unknown path 404, and a client that has not sent its head within the request timeout (the
proxy listeners' ZEP_TIMEOUT_HANDSHAKE) gets 408.
Requests are logged at debug level only: a probe every few seconds is not news.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import httptools

from zep.config import split_host_port
from zep.metrics import CONTENT_TYPE

log = logging.getLogger("zep.admin")

MAX_HEAD_BYTES = 8192
TEXT = "text/plain; charset=utf-8"

# None when ready, else why not ("loading Ziti identities", "draining", ...).
Readiness = Callable[[], str | None]
# Brings the exposition up to date before a scrape (the supervisor of workers fetches theirs).
Refresh = Callable[[], Awaitable[None]]


class Exposition(Protocol):
    def exposition(self) -> bytes: ...


@dataclass(frozen=True)
class Request:
    method: str
    path: str


@dataclass(frozen=True)
class Malformed:
    status: int
    reason: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}",
                 "Cache-Control: no-store", "Connection: close",
                 *(f"{name}: {value}" for name, value in self.headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


class RequestReader:
    """Sans-IO: feed bytes until feed() returns a Request or a Malformed (None: more needed)."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._max = max_head_bytes
        self._url = bytearray()
        self._seen = 0
        self._head_complete = False

    def on_url(self, url: bytes) -> None:  # httptools callback
        self._url += url

    def on_headers_complete(self) -> None:  # httptools callback
        self._head_complete = True

    def feed(self, data: bytes) -> Request | Malformed | None:
        self._seen += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade header: the head is complete, and zep upgrades nothing
        except httptools.HttpParserError as exc:
            if not self._head_complete:  # what follows a complete head is not read
                return Malformed(400, f"malformed request: {exc}")
        if self._head_complete:
            return self._request()
        if self._seen > self._max:
            return Malformed(431, f"request head larger than {self._max} bytes")
        return None

    def feed_eof(self) -> Malformed:
        return Malformed(400, "the client closed before a complete request head")

    def _request(self) -> Request | Malformed:
        method = self._parser.get_method().decode("ascii", "replace")
        try:
            path = httptools.parse_url(bytes(self._url)).path or b"/"
        except httptools.HttpParserInvalidURLError:
            if method in ("GET", "HEAD"):
                return Malformed(400, "malformed request target")
            path = b"*"
        return Request(method, path.decode("ascii", "replace"))


class Admin:
    """The answers, given the metrics and how to tell readiness."""

    def __init__(self, metrics: Exposition, readiness: Readiness, refresh: Refresh | None = None) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.refresh = refresh

    async def prepare(self, request: Request | Malformed) -> None:
        if self.refresh is not None and isinstance(request, Request) and request.path == "/metrics":
            await self.refresh()

    def answer(self, request: Request | Malformed) -> Response:
        if isinstance(request, Malformed):
            return Response(request.status, f"{request.reason}\n".encode())
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers=(("Allow", "GET, HEAD"),))
        if request.path == "/healthz":
            return Response(200, b"ok\n")
        if request.path == "/readyz":
            why_not = self.readiness()
            return Response(200, b"ready\n") if why_not is None else Response(503, f"not ready: {why_not}\n".encode())
        if request.path == "/metrics":
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)
        return Response(404, b"not found: try /healthz, /readyz or /metrics\n")


class AdminServer:
    def __init__(self, admin: Admin, sock: socket.socket, request_timeout: float) -> None:
        self.admin = admin
        self.sock = sock
        self.request_timeout = request_timeout  # for the head to arrive, and again for the answer to leave
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self.sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request: Request | Malformed | None = None
        try:
            try:
                async with asyncio.timeout(self.request_timeout):
                    request = await _read_request(reader)
            except TimeoutError:
                request = Malformed(408, f"no complete request head within {self.request_timeout:g} s")
            await self.admin.prepare(request)
            response = self.admin.answer(request)
            writer.write(response.encode(head_only=isinstance(request, Request) and request.method == "HEAD"))
            async with asyncio.timeout(self.request_timeout):
                await writer.drain()
            log.debug("admin: %s -> %d", request, response.status)
        except (OSError, TimeoutError) as exc:  # the client went away, or would not take the answer
            log.debug("admin: %s: %s", request, exc or type(exc).__name__)
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | Malformed:
    parser = RequestReader()
    while True:
        data = await reader.read(4096)
        result = parser.feed(data) if data else parser.feed_eof()
        if result is not None:
            return result


async def start(admin: Admin, sock: socket.socket, request_timeout: float) -> AdminServer:
    """Serve `admin` on `sock` (from listen_socket) and say where."""
    server = AdminServer(admin, sock, request_timeout)
    await server.start()
    host, port = server.address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("listening: admin on %s (/healthz, /readyz, /metrics)", where)
    if not ipaddress.ip_address(host).is_loopback:
        log.info("the admin listener on %s is reachable from other machines: it serves health, readiness and "
                 "metrics, never a proxy", where)
    return server


def listen_socket(address: str) -> socket.socket:
    """The listening socket for ZEP_ADMIN_ADDRESS (validated HOST:PORT)."""
    return bind(*split_host_port(address))


def bind(host: str, port: int) -> socket.socket:
    """The admin listening socket; `::` takes IPv4 too."""
    try:
        family, _type, _proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address[:2], family=family,
                                    dualstack_ipv6=family == socket.AF_INET6 and host == "::")
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot listen on admin address {where}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
