"""`zep serve --workers N`: a supervisor and N worker processes sharing the listening ports.

Real processes throughout: the supervisor and its workers started by `python -m zep serve`, real
clients, and /proc to see which process listens on which port and holds which connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import curl, recv_exactly, socks_session
from tests.support.processes import gone, holder_of_connection, listening_ports, wait_until
from tests.support.upstreams import TCPUpstream, Upstream, payload
from tests.support.zepproc import ZepProcess, run_zep, start_zep
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)
from zep.config import available_cpus
from zep.pool import STOP_MARGIN

WAIT = 20.0  # for a worker to come back, log lines to appear, processes to go


def echo_through(zp: ZepProcess, echo: TCPUpstream, size: int = 100) -> None:
    data = os.urandom(size)
    with socks_session(zp.socks_port, "127.0.0.1", echo.port, timeout=5) as (sock, reply):
        assert reply == 0
        sock.sendall(data)
        assert recv_exactly(sock, size) == data


def worker_tags(lines: list[str]) -> set[str]:
    return {line.split(" worker=")[1].split()[0] for line in lines if " worker=" in line}


@pytest.fixture(scope="module")
def zep2() -> Iterator[ZepProcess]:
    with start_zep("--direct", "--dumpable", "--workers", "2") as zp:
        yield zp


@pytest.fixture
def own_zep2() -> Iterator[ZepProcess]:
    """Two workers for a test that kills or stops processes."""
    with start_zep("--direct", "--dumpable", "--workers", "2") as zp:
        yield zp


# ------------------------------------------------------------------------- the ports


def test_both_workers_listen_on_the_same_ports_and_the_supervisor_on_none(zep2: ZepProcess) -> None:
    pids = zep2.worker_pids()
    assert sorted(pids) == ["1", "2"]
    assert zep2.socks_port and zep2.http_port  # port 0 was asked for: the supervisor chose them
    for pid in pids.values():
        assert listening_ports(pid) == {zep2.socks_port, zep2.http_port}
    assert listening_ports(zep2.proc.pid) == set()


def test_curl_through_both_listeners(zep2: ZepProcess, http_a: Upstream) -> None:
    url = f"http://127.0.0.1:{http_a.port}/whoami"
    for proxy in (f"socks5h://127.0.0.1:{zep2.socks_port}", f"http://127.0.0.1:{zep2.http_port}"):
        result = curl("--proxy", proxy, url)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["server"] == "a"


def test_connections_are_spread_over_both_workers(zep2: ZepProcess, echo: TCPUpstream) -> None:
    """200 short connections: each is answered (none went to the supervisor's reserved socket), and
    both workers' access lines appear (the kernel hashes each connection to one listener)."""
    target = f"target=127.0.0.1:{echo.port} "

    def echo_lines() -> list[str]:
        return [line for line in zep2.access_lines() if target in line]

    before = len(echo_lines())
    for _ in range(200):
        echo_through(zep2, echo)
    wait_until(lambda: len(echo_lines()) >= before + 200, "200 access lines", WAIT)
    lines = echo_lines()[before:]
    assert len(lines) == 200 and all("outcome=ok" in line for line in lines)
    assert worker_tags(lines) == {"1", "2"}


def test_workers_share_ipv6_ports(http_a: Upstream) -> None:
    with start_zep("--direct", "--dumpable", "--workers", "2", "--host", "::1", "--socks-port", "0", "--http-port", "0",
                   default_args=False) as zp:
        assert zp.ready_info()["socks5"] == f"[::1]:{zp.socks_port}"
        for pid in zp.worker_pids().values():
            assert listening_ports(pid) == {zp.socks_port, zp.http_port}
        result = curl("--proxy", f"http://[::1]:{zp.http_port}", f"http://127.0.0.1:{http_a.port}/whoami")
        assert result.returncode == 0, result.stderr


def test_json_log_lines_carry_the_worker(echo: TCPUpstream) -> None:
    with start_zep("--direct", "--dumpable", "--workers", "2", "--log-format", "json") as zp:
        for _ in range(40):
            echo_through(zp, echo)
        wait_until(lambda: zp.log_text().count('"outcome":"ok"') >= 40, "40 access entries", WAIT)
    lines = [json.loads(line) for line in zp.log_text().splitlines() if line.startswith("{")]
    entries = [line for line in lines if "outcome" in line]
    assert len(entries) == 40 and {entry["worker"] for entry in entries} == {"1", "2"}
    assert {line["worker"] for line in lines if line.get("logger") == "zep" and "ready" in line["message"]} == {"1", "2"}


def test_a_second_zep_cannot_share_the_ports(zep2: ZepProcess) -> None:
    """SO_REUSEPORT would let a second zep of the same user join the port and take half of the
    first one's connections: it must fail as a port in use does."""
    result = run_zep("serve", "--direct", "--workers", "2", "--socks-port", str(zep2.socks_port), "--http-port", "0")
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{zep2.socks_port}: address in use" in result.stderr


# ------------------------------------------------------------------------- restarts


def test_killed_worker_is_restarted_and_the_other_workers_transfer_is_intact(own_zep2: ZepProcess,
                                                                             echo: TCPUpstream) -> None:
    zp = own_zep2
    pids = zp.worker_pids()
    sent, received = hashlib.sha256(), hashlib.sha256()
    chunk = payload(1 << 20, seed=11)
    with socks_session(zp.socks_port, "127.0.0.1", echo.port) as (sock, reply):
        assert reply == 0

        def transfer(chunks: int) -> None:
            for _ in range(chunks):
                sock.sendall(chunk)
                sent.update(chunk)
                received.update(recv_exactly(sock, len(chunk)))

        transfer(4)
        holder = holder_of_connection(list(pids.values()), zp.socks_port, sock.getsockname()[1])
        (holder_id,) = [wid for wid, pid in pids.items() if pid == holder]
        (victim_id,) = [wid for wid in pids if wid != holder_id]
        victim = pids[victim_id]
        os.kill(victim, signal.SIGKILL)
        zp.wait_for_log(f"worker {victim_id} (pid {victim}) killed by SIGKILL after", timeout=WAIT)
        zp.wait_for_log("restarting it in 0.5 s")
        restarted = wait_until(lambda: zp.worker_pids()[victim_id] != victim and zp.worker_pids()[victim_id],
                               "the ready file names the restarted worker", WAIT)
        assert listening_ports(restarted) == {zp.socks_port, zp.http_port}
        transfer(4)
    assert received.hexdigest() == sent.hexdigest()
    assert zp.log_text().count("all 2 workers ready") == 2
    assert not gone(holder) and zp.worker_pids()[holder_id] == holder  # never restarted


def test_config_error_in_the_workers_exits_2_once(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-identity.json"
    result = run_zep("serve", "--workers", "2", "--identity", str(missing), "--socks-port", "0", "--http-port", "0")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("zep: error: ")]
    assert errors == [f"zep: error: Ziti identity file {missing} does not exist"]
    assert result.stderr.count("started as proxy") == 2  # each worker once: no restart loop
    assert "restarting" not in result.stderr


# ------------------------------------------------------------------------- stopping


def test_sigterm_stops_every_worker_and_exits_0(own_zep2: ZepProcess, echo: TCPUpstream) -> None:
    pids = own_zep2.worker_pids().values()
    echo_through(own_zep2, echo)
    assert own_zep2.stop(signal.SIGTERM, timeout=WAIT) == 0
    assert all(gone(pid) for pid in pids)
    assert own_zep2.ready_path is not None and not own_zep2.ready_path.exists()  # removed, as one process does
    assert own_zep2.log_text().count("exited with status 0") == 2


def test_sigterm_drains_every_worker_and_a_second_sigterm_stops_them_at_once(echo: TCPUpstream) -> None:
    with start_zep("--direct", "--dumpable", "--workers", "2", "--drain-timeout", "60") as zp:
        with socks_session(zp.socks_port, "127.0.0.1", echo.port) as (sock, reply):
            assert reply == 0
            zp.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: zp.log_text().count("draining: no new connections") == 2, "both workers drain", WAIT)
            sock.sendall(b"still relayed")  # the tunnel outlives the first signal
            assert recv_exactly(sock, 13) == b"still relayed"
            zp.proc.send_signal(signal.SIGTERM)
            zp.wait_for_log("SIGTERM again: passing it on")
            assert zp.proc.wait(WAIT) == 0  # long before the 60 s drain is over
    assert "stopping at once: closing 1 open connections" in zp.log_text()


def test_a_stuck_worker_is_killed_after_the_drain_timeout_and_the_margin() -> None:
    with start_zep("--direct", "--dumpable", "--workers", "2", "--drain-timeout", "1") as zp:
        stuck, other = zp.worker_pids()["1"], zp.worker_pids()["2"]
        os.kill(stuck, signal.SIGSTOP)  # cannot act on SIGTERM
        try:
            zp.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: gone(other), "the other worker stops", WAIT)
            assert zp.proc.wait(1 + STOP_MARGIN + WAIT) == 1  # not a clean stop: one worker had to be killed
        finally:
            if not gone(stuck):
                os.kill(stuck, signal.SIGKILL)
        bound = 1 + STOP_MARGIN
        assert f"worker 1 (pid {stuck}) still running {bound:g} s after the stop signal: killing it" in zp.log_text()
        assert gone(stuck)


def test_workers_stop_when_the_supervisor_dies(own_zep2: ZepProcess) -> None:
    pids = own_zep2.worker_pids().values()
    own_zep2.proc.kill()
    own_zep2.proc.wait(WAIT)
    wait_until(lambda: all(gone(pid) for pid in pids), "orphaned workers stop", WAIT)
    assert own_zep2.log_text().count("the supervisor is gone: stopping") == 2


# ------------------------------------------------------------------------- settings


def test_auto_starts_one_worker_per_available_cpu(echo: TCPUpstream) -> None:
    with start_zep("--direct", "--dumpable", "--workers", "auto") as zp:
        echo_through(zp, echo)
        expected = available_cpus()
        assert len(zp.worker_pids()) == (expected if expected > 1 else 0)


def test_zep_workers_variable_and_one_worker_is_todays_single_process(echo: TCPUpstream) -> None:
    with start_zep("--direct", "--dumpable", env={"ZEP_WORKERS": "2"}) as zp:
        assert sorted(zp.worker_pids()) == ["1", "2"]
    with start_zep("--direct", "--dumpable", env={"ZEP_WORKERS": "1"}) as zp:
        echo_through(zp, echo)
        assert zp.worker_pids() == {} and listening_ports(zp.proc.pid) == {zp.socks_port, zp.http_port}
        assert " worker=" not in zp.log_text()


def test_random_credentials_are_made_once_for_every_worker(echo: TCPUpstream) -> None:
    with start_zep("--direct", "--dumpable", "--random-credentials", "--workers", "2") as zp:
        info = zp.ready_info()
        credentials = (info["username"], info["password"])
        for _ in range(40):
            with socks_session(zp.socks_port, "127.0.0.1", echo.port, credentials=credentials) as (_sock, reply):
                assert reply == 0
        wait_until(lambda: len([line for line in zp.access_lines() if f"user={credentials[0]} " in line]) >= 40,
                   "40 access lines", WAIT)
        assert worker_tags([line for line in zp.access_lines() if f"user={credentials[0]} " in line]) == {"1", "2"}
    assert credentials[1] not in zp.log_text()


def test_no_secret_on_any_command_line_and_no_identity_in_the_supervisor(
        tmp_path: Path, openziti_path: Path, http_a: Upstream) -> None:  # noqa: F811
    identity = write_identity(tmp_path / "ci.json", [service("web", ["web.workers.test"], ["80"],
                                                             f"127.0.0.1:{http_a.port}")])
    encoded = base64.b64encode(identity.read_bytes()).decode()
    password, upstream_password = "pw-6f1d2c9e", "up-91b07a3d"
    env = {"ZITI_IDENTITY": encoded, "PROXY_USERNAME": "ci", "PROXY_PASSWORD": password,
           "ZEP_UPSTREAM_PROXY": f"http://corp:{upstream_password}@127.0.0.1:3128"}
    with start_zep("--dumpable", "--workers", "2", env=env, extra_pythonpath=[str(openziti_path)]) as zp:
        result = curl("--proxy", f"socks5h://ci:{password}@127.0.0.1:{zp.socks_port}", "http://web.workers.test/whoami")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["server"] == "a"
        supervisor, workers = zp.proc.pid, list(zp.worker_pids().values())
        secrets = [password.encode(), upstream_password.encode(), encoded[:40].encode(), b"web.workers.test"]
        for pid in (supervisor, *workers):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert not any(secret in cmdline for secret in secrets), cmdline
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert not any(secret in environ for secret in secrets)
            assert "libziti" in Path(f"/proc/{pid}/maps").read_text()
        assert "libziti" not in Path(f"/proc/{supervisor}/maps").read_text()
    assert zp.log_text().count("ziti identity loaded: ZITI_IDENTITY") == 2  # one controller session per worker
    assert password not in zp.log_text() and upstream_password not in zp.log_text()
