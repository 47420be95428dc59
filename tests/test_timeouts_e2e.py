"""Every named timeout through a real `zep serve`, each with a silent peer: no connection of any
kind outlives its timeouts, the client gets the protocol's answer, and the access line says why."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.clients import curl, recv_exactly, recv_until_eof, socks_session
from tests.support.zepproc import ZepProcess, start_zep

SHORT = "0.5"
BOUND = 10  # seconds a test waits for zep to act: far beyond every timeout, so a hang fails the test


@pytest.fixture(scope="module")
def zep_short(relay_impl: str, driver: str) -> Iterator[ZepProcess]:
    with start_zep("--direct", "--timeout-http-request", SHORT, "--timeout-http-keep-alive", SHORT,
                   "--timeout-client", SHORT, "--timeout-server", SHORT, "--timeout-tunnel", SHORT,
                   relay=relay_impl, driver=driver) as zp:
        yield zp


@contextmanager
def silent_upstream() -> Iterator[int]:
    """A port whose connections complete in the kernel and are never accepted, read or answered."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@contextmanager
def upstream_that_stops(response: bytes, stream: bool = False) -> Iterator[int]:
    """Reads a request head, sends `response` (a head and part of its body), then goes silent;
    or, with `stream`, goes on sending body bytes for as long as they are taken."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        held.append(conn)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        try:
            conn.sendall(response)
            while stream:
                conn.sendall(bytes(65536))
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for conn in held:
            conn.close()


def connect(zp: ZepProcess, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    return sock


def line_for(zp: ZepProcess, sock_name: tuple) -> str:
    return zp.wait_for_log(f"client=127.0.0.1:{sock_name[1]} ")


# ----------------------------------------------------------------------------- http-request


def test_http_request_timeout_socks5_handshake(zep_short):
    with connect(zep_short, zep_short.socks_port) as sock:
        sock.sendall(b"\x05\x01")  # a greeting that never completes
        assert recv_until_eof(sock) == b""
        line = line_for(zep_short, sock.getsockname())
    assert "outcome=request-timeout term=cR" in line


def test_http_request_timeout_http_head(zep_short):
    with connect(zep_short, zep_short.http_port) as sock:
        sock.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 408 ")
        assert "outcome=request-timeout" in line_for(zep_short, sock.getsockname())


def test_http_request_timeout_connection_that_never_speaks(zep_short):
    with connect(zep_short, zep_short.http_port) as sock:
        assert recv_until_eof(sock) == b""
        assert "outcome=request-timeout" in line_for(zep_short, sock.getsockname())


# ----------------------------------------------------------------------------- client


@pytest.mark.parametrize("body", [
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=",  # the fuzz run's chunked body cut short
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel",
    b"Content-Length: 100\r\n\r\n0123456789",
])
def test_client_timeout_body_cut_short(zep_short, http_a, body):
    with connect(zep_short, zep_short.http_port) as sock:
        sock.sendall(f"POST http://127.0.0.1:{http_a.port}/sha256 HTTP/1.1\r\nHost: x\r\n".encode() + body)
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 408 ")
        line = line_for(zep_short, sock.getsockname())
    assert "method=POST" in line and "status=408" in line and "outcome=client-timeout term=cD" in line


def test_client_timeout_curl_upload_that_stalls(zep_short, http_a):
    """curl uploads from a pipe that stays open with nothing more in it: the body never ends."""
    proc = subprocess.Popen(["curl", "--silent", "--noproxy", "", "-x", f"http://127.0.0.1:{zep_short.http_port}",
                             "-H", "Expect:", "-T", "-", "--write-out", "%{http_code}", "--output", "/dev/null",
                             f"http://127.0.0.1:{http_a.port}/stalls"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    try:
        proc.stdin.write(b"the first part of a body")
        proc.stdin.flush()
        line = zep_short.wait_for_log(f"target=http://127.0.0.1:{http_a.port} path=/stalls status=408")
        proc.stdin.close()  # curl waits on its own input: let it go to see what it got
        proc.wait(BOUND)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert "outcome=client-timeout" in line
    assert out == b"408"


def test_client_timeout_client_that_stops_reading(zep_short):
    with upstream_that_stops(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n", stream=True) as port, \
            connect(zep_short, zep_short.http_port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET http://127.0.0.1:{port}/big HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        line = line_for(zep_short, sock.getsockname())  # logged while we still have not read a byte
    assert "status=200" in line and "outcome=client-timeout term=cD" in line


# ----------------------------------------------------------------------------- server


def test_server_timeout_silent_upstream_curl_gets_504(zep_short):
    with silent_upstream() as port:
        result = curl("-x", f"http://127.0.0.1:{zep_short.http_port}", "--write-out", "%{http_code}",
                      "--output", "/dev/null", f"http://127.0.0.1:{port}/silent", timeout=BOUND)
        assert result.stdout == b"504"
        line = zep_short.wait_for_log(f"target=http://127.0.0.1:{port} path=/silent")
    assert "status=504" in line and "outcome=server-timeout term=sH" in line


def test_server_timeout_upstream_that_stops_mid_response(zep_short):
    with upstream_that_stops(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789") as port:
        result = curl("-x", f"http://127.0.0.1:{zep_short.http_port}", f"http://127.0.0.1:{port}/stops",
                      timeout=BOUND)
        assert result.returncode in (18, 56), result  # partial file / receive failure: never taken for whole
        assert result.stdout == b"0123456789"
        line = zep_short.wait_for_log(f"target=http://127.0.0.1:{port} path=/stops")
    assert "status=200" in line and "outcome=server-timeout term=sD" in line


def test_server_timeout_upstream_that_does_not_read_the_body(zep_short, tmp_path):
    upload = tmp_path / "upload"
    with open(upload, "wb") as out:
        out.truncate(64 * 1024 * 1024)
    with silent_upstream() as port:
        result = curl("-x", f"http://127.0.0.1:{zep_short.http_port}", "-H", "Expect:", "-T", str(upload),
                      "--write-out", "%{http_code}", "--output", "/dev/null", f"http://127.0.0.1:{port}/upload",
                      timeout=BOUND)
        assert result.stdout == b"504", result
        line = zep_short.wait_for_log(f"target=http://127.0.0.1:{port} path=/upload")
    assert "outcome=server-timeout term=sD" in line


# ----------------------------------------------------------------------------- http-keep-alive, tunnel


def test_http_keep_alive_timeout_closes_an_idle_connection_quietly(zep_short, http_a):
    with connect(zep_short, zep_short.http_port) as sock:
        sock.sendall(f"GET http://127.0.0.1:{http_a.port}/whoami HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert b"Connection: keep-alive" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        recv_exactly(sock, length)
        assert recv_until_eof(sock) == b""  # closed by the keep-alive timeout
        client = f"client=127.0.0.1:{sock.getsockname()[1]} "
    assert len([line for line in zep_short.access_lines() if client in line]) == 1


def test_tunnel_timeout_http_connect(zep_short, echo):
    with connect(zep_short, zep_short.http_port) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode())
        assert recv_exactly(sock, 39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        with pytest.raises(ConnectionResetError):  # a tunnel that did not finish both ways is reset
            recv_until_eof(sock)
        assert "outcome=tunnel-timeout" in line_for(zep_short, sock.getsockname())


def test_tunnel_timeout_socks5(zep_short, echo):
    with socks_session(zep_short.socks_port, echo.host, echo.port, timeout=BOUND) as (sock, reply):
        assert reply == 0
        with pytest.raises(ConnectionResetError):
            recv_until_eof(sock)
        assert "outcome=tunnel-timeout" in line_for(zep_short, sock.getsockname())
