"""A small HTTP CONNECT proxy on loopback, to stand as the corporate proxy zep goes through.

It checks Basic credentials (407 when wrong or missing), refuses blocked hosts with 403, counts
the connections it accepts and records each CONNECT it was asked for. It only ever connects to
loopback targets; a few made-up hosts make it misbehave on purpose:

- `status-NNN.test`: answers CONNECT with status NNN;
- `silent.test`: reads the request and never answers;
- `garbage.test`: answers with something that is not HTTP;
- `early.test`: answers 200 and, in the same write, the first bytes of the "destination"
  (`EARLY_BYTES`), then echoes what it receives.
"""

from __future__ import annotations

import base64
import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.clients import recv_head
from tests.support.upstreams import BACKLOG

EARLY_BYTES = b"220 early bytes from the destination\r\n"
LOOPBACK_TARGETS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ConnectProxy:
    host: str
    port: int
    username: str
    password: str
    blocked: set[str] = field(default_factory=set)
    connects: list[str] = field(default_factory=list)  # "host:port" of every CONNECT asked for
    accepted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, username: str | None = None, password: str | None = None) -> str:
        user = self.username if username is None else username
        secret = self.password if password is None else password
        return f"http://{user}:{secret}@{self.host}:{self.port}" if user else f"http://{self.host}:{self.port}"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        with proxy.lock:
            proxy.accepted += 1
        sock: socket.socket = self.request
        head = recv_head(sock)
        if not head:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = (lines[0].split(" ") + ["", ""])[:3]
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        if method != "CONNECT":
            return self._answer(400, "Bad Request")
        if not self._authorized(headers.get("proxy-authorization", "")):
            return self._answer(407, "Proxy Authentication Required", 'Proxy-Authenticate: Basic realm="test"\r\n')
        host, _, port_text = target.rpartition(":")
        host = host.strip("[]")
        with proxy.lock:
            proxy.connects.append(target)
        if host in proxy.blocked:
            return self._answer(403, "Forbidden")
        if host.startswith("status-") and host.endswith(".test"):
            return self._answer(int(host[7:10]), "Test Status")
        if host == "silent.test":
            while sock.recv(4096):
                pass
            return None
        if host == "garbage.test":
            sock.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
            return None
        if host == "early.test":
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n" + EARLY_BYTES)
            while data := sock.recv(65536):
                sock.sendall(data)
            return None
        if host not in LOOPBACK_TARGETS:
            return self._answer(502, "Bad Gateway")
        try:
            upstream = socket.create_connection((host, int(port_text)), timeout=5)
        except OSError:
            return self._answer(502, "Bad Gateway")
        with upstream:
            upstream.settimeout(None)
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            _pump(sock, upstream)
        return None

    def _authorized(self, value: str) -> bool:
        proxy = self.server.proxy
        if not proxy.username:
            return True
        scheme, _, token = value.partition(" ")
        try:
            decoded = base64.b64decode(token, validate=True).decode()
        except ValueError:
            return False
        return scheme.lower() == "basic" and decoded == f"{proxy.username}:{proxy.password}"

    def _answer(self, status: int, reason: str, extra: str = "") -> None:
        body = f"{status} {reason}\n".encode()
        self.request.sendall(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: {len(body)}\r\n"
                             "Connection: close\r\n\r\n".encode() + body)


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides are done, passing half-closes on."""
    open_ends = {a: b, b: a}
    while open_ends:
        readable, _, _ = select.select(list(open_ends), [], [])
        for source in readable:
            try:
                data = source.recv(65536)
            except OSError:
                return
            peer = open_ends[source]
            if data:
                peer.sendall(data)
            else:
                del open_ends[source]
                try:
                    peer.shutdown(socket.SHUT_WR)
                except OSError:
                    pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        super().__init__((proxy.host, 0), _Handler)


@contextmanager
def connect_proxy(username: str = "", password: str = "", blocked: set[str] | None = None) -> Iterator[ConnectProxy]:
    proxy = ConnectProxy("127.0.0.1", 0, username, password, blocked or set())
    server = _Server(proxy)
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
