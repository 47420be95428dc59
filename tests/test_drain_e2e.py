"""SIGTERM drains a real `zep serve`: no new connections, kept-alive ones closed between requests,
what is in flight finishes within ZEP_DRAIN_TIMEOUT, the rest is cut and logged `cancelled`."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.clients import recv_exactly, recv_until_eof, sha256_file, socks_session
from tests.support.upstreams import Upstream, payload, sha256
from tests.support.zepproc import ZepProcess, start_zep

BOUND = 10.0


def drain(zp: ZepProcess) -> None:
    zp.proc.send_signal(signal.SIGTERM)
    zp.wait_for_log("draining: no new connections")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=BOUND).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {BOUND} s")
        time.sleep(0.02)


@contextmanager
def curl_download(url: str, out: Path, *args: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["curl", "--silent", "--show-error", "--noproxy", "", *args, "--output", str(out), url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_transfer_that_fits_completes_and_new_connections_are_refused(relay_impl, driver, http_a: Upstream, tmp_path):
    size = 4 * 1024 * 1024
    marker = f"drain-fits-{relay_impl}-{driver}"
    url = f"http://127.0.0.1:{http_a.port}/bytes/{size}?{marker}"
    with start_zep("--direct", "--drain-timeout", "20", relay=relay_impl, driver=driver) as zp:
        with curl_download(url, tmp_path / "out", "--socks5-hostname", f"127.0.0.1:{zp.socks_port}",
                           "--limit-rate", "2M") as proc:
            wait_until(lambda: any(path.endswith(marker) for _, path, _ in http_a.requests), "the request")
            drain(zp)
            assert refused(zp.socks_port) and refused(zp.http_port)
            assert proc.wait(BOUND * 2) == 0, proc.stderr.read()
        assert sha256_file(tmp_path / "out") == sha256(payload(size))
        assert zp.proc.wait(BOUND) == 0  # it exits once the last connection is done
        assert "outcome=ok" in zp.wait_for_log("target=127.0.0.1:")


def test_a_transfer_that_does_not_fit_is_cut_and_logged_cancelled(relay_impl, driver, echo):
    with start_zep("--direct", "--drain-timeout", "0.5", relay=relay_impl, driver=driver) as zp:
        with socks_session(zp.socks_port, echo.host, echo.port) as (sock, reply):
            assert reply == 0
            sock.sendall(b"before")
            assert recv_exactly(sock, 6) == b"before"
            drain(zp)
            sock.sendall(b"during")  # still carried while the drain timeout runs
            assert recv_exactly(sock, 6) == b"during"
            sock.settimeout(BOUND)
            try:  # then cut (reset or closed: either way before our own BOUND)
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        assert zp.proc.wait(BOUND) == 0
        assert "up=12 down=12" in zp.wait_for_log("outcome=cancelled")


def test_kept_alive_connection_is_closed_between_requests_and_in_flight_ones_are_told(relay_impl, driver, http_a):
    release = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    got_head = threading.Event()

    def slow_upstream() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            got_head.set()
            release.wait(BOUND)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            conn.recv(1)

    threading.Thread(target=slow_upstream, daemon=True).start()
    with start_zep("--direct", "--drain-timeout", "20", relay=relay_impl, driver=driver) as zp, listener:
        idle = socket.create_connection(("127.0.0.1", zp.http_port), timeout=BOUND)
        busy = socket.create_connection(("127.0.0.1", zp.http_port), timeout=BOUND)
        with idle, busy:
            idle.sendall(f"GET http://127.0.0.1:{http_a.port}/whoami HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += idle.recv(1)
            recv_exactly(idle, int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            busy.sendall(f"GET http://127.0.0.1:{listener.getsockname()[1]}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert got_head.wait(BOUND)
            drain(zp)
            assert recv_until_eof(idle) == b""  # closed at once, between requests
            release.set()
            answer = recv_until_eof(busy)
            assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer and answer.endswith(b"slow")
        assert zp.proc.wait(BOUND) == 0


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once(relay_impl, driver, echo, second):
    with start_zep("--direct", relay=relay_impl, driver=driver) as zp:  # the default drain timeout, 25 s
        with socks_session(zp.socks_port, echo.host, echo.port) as (sock, reply):
            assert reply == 0
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            drain(zp)
            zp.proc.send_signal(second)
            assert zp.proc.wait(BOUND) == 0
            sock.settimeout(BOUND)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        assert "up=4 down=4" in zp.wait_for_log("outcome=cancelled")
