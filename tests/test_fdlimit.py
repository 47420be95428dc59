"""The open-files limit: raised at start, sizing maxconn, and running out of fds without harm."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.clients import curl, socks_connect_request
from tests.support.upstreams import TCPUpstream, Upstream
from tests.support.zepproc import ZepProcess, start_zep
from zep import fdlimit

EXHAUSTION_CLIENTS = 200  # well past what a 128-fd limit carries
SETTLE_TIMEOUT = 20.0


def open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return lower


def soft_limit_of(zp: ZepProcess) -> int:
    with open(f"/proc/{zp.proc.pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/PID/limits")


def cpu_seconds(zp: ZepProcess) -> float:
    with open(f"/proc/{zp.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


# ----------------------------------------------------------------------------- the limit and maxconn


def test_maxconn_default_fits_the_limit() -> None:
    assert fdlimit.max_connections_for(20000, ziti=False) == (20000 - fdlimit.RESERVED_FDS) // 3
    assert fdlimit.max_connections_for(20000, ziti=True) == (20000 - fdlimit.RESERVED_FDS) // 5
    assert fdlimit.max_connections_for(10, ziti=False) == 1


def test_soft_limit_is_raised_to_the_hard_limit_and_sizes_maxconn() -> None:
    with start_zep("--direct", preexec_fn=open_files_limit(256, 4096)) as zp:
        assert soft_limit_of(zp) == 4096
        expected = fdlimit.max_connections_for(4096, ziti=False)
        line = zp.wait_for_log("open files:")
        assert "limit 4096 (raised from 256)" in line
        assert f"maxconn {expected} " in line


def test_configured_maxconn_beyond_the_limit_is_warned_about() -> None:
    with start_zep("--direct", "--maxconn", "5000", preexec_fn=open_files_limit(1024, 1024)) as zp:
        line = zp.wait_for_log("open files:")
        assert "maxconn 5000 (configured) does not fit" in line
        assert "WARNING" in line and "limit 1024" in line


# ----------------------------------------------------------------------------- running out of fds


@contextlib.contextmanager
def many_tunnels(port: int, target: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` clients, each sending its SOCKS5 greeting and CONNECT at once and then holding on."""
    request = b"\x05\x01\x00" + socks_connect_request("127.0.0.1", target)
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(request)
            clients.append(sock)
        yield clients
    finally:
        for sock in clients:
            sock.close()


def wait_until(condition: Callable[[], bool], timeout: float, failure: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s: {failure()}")
        time.sleep(0.05)


def test_running_out_of_fds_neither_spins_nor_stops(relay_impl: str, driver: str, echo: TCPUpstream,
                                                              http_a: Upstream) -> None:
    """Out of fds, zep neither spins nor stops: with the handshake in Python, accept runs out first
    (the backlog is taken before any dial) and pauses; with the handshake in the relay engine, the
    engine dials a remembered destination while accepts go on, so its connects may run out first
    and those clients get their dial failure at once. Either way every client is answered and zep
    serves again once the clients have gone."""
    exhausted = "pausing accepts" if driver != "native" else ("pausing accepts", "Too many open files")
    with start_zep("--direct", "--maxconn", "1000", relay=relay_impl, driver=driver,
                   preexec_fn=open_files_limit(128, 128)) as zp:
        with many_tunnels(zp.socks_port, echo.port, EXHAUSTION_CLIENTS):
            wait_until(lambda: any(needle in zp.log_text() for needle in exhausted), SETTLE_TIMEOUT,
                       lambda: f"fds never ran out:\n{zp.log_text()}")
            before = cpu_seconds(zp)
            started = time.monotonic()
            time.sleep(1.0)  # a measuring interval, not a synchronization: a spinning loop burns it all
            spent = cpu_seconds(zp) - before
            assert spent < 0.5 * (time.monotonic() - started), f"zep used {spent:.2f} s of CPU while out of fds"
            assert zp.proc.poll() is None
        # Every client is answered (a tunnel, or a dial failure for want of fds) once it has closed.
        wait_until(lambda: len(zp.access_lines()) >= EXHAUSTION_CLIENTS, SETTLE_TIMEOUT,
                   lambda: f"{len(zp.access_lines())} of {EXHAUSTION_CLIENTS} clients logged:\n{zp.log_text()}")
        result = curl("-x", f"socks5h://127.0.0.1:{zp.socks_port}", f"http://{http_a.authority}/whoami")
        assert result.returncode == 0, result
        assert json.loads(result.stdout)["server"] == "a"
        log = zp.log_text()
        pauses = log.count("pausing accepts")
        if driver != "native" or pauses:
            zp.wait_for_log("accepting again")
        assert pauses == 1 if driver != "native" else pauses <= 1, log
        assert "Traceback" not in log
