"""Client helpers: curl runs, raw SOCKS5 exchanges and blackholed ports on loopback."""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run curl with no proxy taken from the environment; output goes where args say."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(["curl", "--silent", "--show-error", "--noproxy", "", *args], env=env,
                          capture_output=True, timeout=timeout)


def curl_sha256(url: str, *args: str, out: Path) -> tuple[int, str]:
    """Fetch url into `out`; return curl's exit code and the file's sha256."""
    result = curl(*args, "--output", str(out), url)
    if result.returncode != 0:
        return result.returncode, result.stderr.decode(errors="replace")
    return 0, hashlib.sha256(out.read_bytes()).hexdigest()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        block = sock.recv(size - len(data))
        if not block:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes: {data!r}")
        data += block
    return data


def recv_until_eof(sock: socket.socket) -> bytes:
    data = b""
    while block := sock.recv(65536):
        data += block
    return data


def recv_head(sock: socket.socket) -> bytes:
    """An HTTP head up to and without its blank line; b"" if the peer closed first."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            return b""
        head += data
    return head.split(b"\r\n\r\n", 1)[0]


def socks_connect_request(host: str, port: int, command: int = 1) -> bytes:
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        address = b"\x01" + packed
    except OSError:
        try:
            address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            encoded = host.encode()
            address = b"\x03" + bytes([len(encoded)]) + encoded
    return b"\x05" + bytes([command]) + b"\x00" + address + struct.pack("!H", port)


def read_socks_reply(sock: socket.socket) -> tuple[int, str, int]:
    """Read a SOCKS5 reply: (reply code, bound host, bound port)."""
    version, reply, _reserved, atyp = recv_exactly(sock, 4)
    assert version == 5
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exactly(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exactly(sock, 16))
    else:
        host = recv_exactly(sock, recv_exactly(sock, 1)[0]).decode()
    (port,) = struct.unpack("!H", recv_exactly(sock, 2))
    return reply, host, port


@contextmanager
def socks_session(port: int, host: str, target_port: int, *, credentials: tuple[str, str] | None = None,
                  timeout: float = 10) -> Iterator[tuple[socket.socket, int]]:
    """Connect through zep's SOCKS5 listener; yields the socket and the reply code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if credentials:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exactly(sock, 2) == b"\x05\x02"
            user, password = (part.encode() for part in credentials)
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            assert recv_exactly(sock, 2) == b"\x01\x00"
        else:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(socks_connect_request(host, target_port))
        reply, _host, _port = read_socks_reply(sock)
        yield sock, reply
    finally:
        sock.close()


@contextmanager
def blackhole_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new SYNs are dropped and connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # a backlog of 0 still admits a connection or two on Linux
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def access_needle(listener: str, authority: str, method: str = "GET") -> str:
    """How an access line names what curl asked for through a listener: a SOCKS5 tunnel to
    host:port, or (HTTP) a forwarded request to http://host:port, or a CONNECT tunnel."""
    if listener == "socks5":
        return f"proto=socks5 target={authority} "
    target = authority if method == "CONNECT" else f"http://{authority}"
    return f"proto=http method={method} target={target} "
