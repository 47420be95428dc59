"""Real upstream servers on loopback for end-to-end tests: HTTP(S), echo, half-close."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import random
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def payload(size: int, seed: int = 7) -> bytes:
    """Deterministic incompressible bytes, so a transfer can be checked by sha256."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    """GET /bytes/N, /chunked/N, /close/N: N payload bytes, framed by length, chunks, or close.
    GET /whoami: the server's name and the request as seen (headers included).
    POST /sha256: the body's sha256 and length (Content-Length or chunked bodies).
    POST or PUT /early413: 413 at once, without reading the body (nor answering `Expect:
    100-continue` first), then close, as a server with a body size limit does."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        self.server.requests.append((self.command, self.path, dict(self.headers.items())))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "whoami":
            body = json.dumps({"server": self.server.name, "path": self.path,
                               "headers": dict(self.headers.items())}).encode()
            self._send(200, body, head)
        elif parts[0] in ("bytes", "chunked", "close") and len(parts) == 2:
            data = payload(int(parts[1]))
            if parts[0] == "bytes":
                self._send(200, data, head)
            elif parts[0] == "chunked":
                self._send_chunked(data)
            else:
                self._send_until_close(data)
        else:
            self._send(404, b"not found\n", head)

    def handle_expect_100(self) -> bool:
        if self.path.startswith("/early413"):
            return True  # the final answer goes out instead of 100 Continue
        return super().handle_expect_100()

    def do_PUT(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        self.server.requests.append((self.command, self.path, dict(self.headers.items())))
        if self.path.startswith("/early413"):
            self.send_response(413)
            self.send_header("Content-Length", "9")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"too large")
            self.close_connection = True
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            digest, length = self._read_chunked()
        else:
            digest, length = self._read_length(int(self.headers.get("Content-Length", "0")))
        self._send(200, json.dumps({"sha256": digest, "length": length}).encode(), False)

    def _read_length(self, remaining: int) -> tuple[str, int]:
        digest, length = hashlib.sha256(), remaining
        while remaining:
            block = self.rfile.read(min(remaining, 1 << 20))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
        return digest.hexdigest(), length - remaining

    def _read_chunked(self) -> tuple[str, int]:
        digest, length = hashlib.sha256(), 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return digest.hexdigest(), length
            digest.update(self.rfile.read(size))
            length += size
            self.rfile.readline()

    def _send(self, status: int, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_chunked(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        view = memoryview(data)
        for start in range(0, len(data), 100_000):
            block = view[start:start + 100_000]
            self.wfile.write(b"%x\r\n" % len(block) + bytes(block) + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _send_until_close(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


# socketserver's default backlog of 5 drops the SYNs of a burst of clients, which then retry
# only after a second or more: tests that open tens of connections at once would stall.
BACKLOG = 256


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], name: str, family: int = socket.AF_INET) -> None:
        self.address_family = family
        self.name = name
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        super().__init__(address, _HTTPHandler)


@dataclass
class Upstream:
    host: str
    port: int
    name: str = ""
    requests: list = field(default_factory=list)

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def http_upstream(name: str, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Upstream]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _HTTPServer((host, 0), name, family)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    with _serving(server):
        yield Upstream(host, server.server_address[1], name, server.requests)


def self_signed_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 'localhost'/127.0.0.1 with a certificate made now; returns it and the CA file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _HalfCloseHandler(socketserver.BaseRequestHandler):
    """Reads until the client's EOF, then answers with the sha256 of what came (client -> server half-close)."""

    def handle(self) -> None:
        digest = hashlib.sha256()
        while data := self.request.recv(65536):
            digest.update(data)
        self.request.sendall(digest.hexdigest().encode())


class _SpeakFirstHandler(socketserver.BaseRequestHandler):
    """Sends a greeting and shuts down its side, then keeps reading (server -> client half-close)."""

    def handle(self) -> None:
        self.request.sendall(b"hello from upstream")
        self.request.shutdown(socket.SHUT_WR)
        received = b""
        while data := self.request.recv(65536):
            received += data
        self.server.received.append(received)  # type: ignore[attr-defined]


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.received: list[bytes] = []
        super().__init__(("127.0.0.1", 0), handler)


@dataclass
class TCPUpstream:
    host: str
    port: int
    received: list[bytes]


@contextmanager
def tcp_upstream(kind: str) -> Iterator[TCPUpstream]:
    handler = {"echo": _EchoHandler, "half-close": _HalfCloseHandler, "speak-first": _SpeakFirstHandler}[kind]
    server = _TCPServer(handler)
    with _serving(server):
        yield TCPUpstream("127.0.0.1", server.server_address[1], server.received)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
