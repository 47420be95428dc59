"""The one admin listener of `zep serve --workers 2`: the supervisor answers the probes from its view
of the workers and merges every worker's metrics, fetched over its channel at scrape time.

Real processes throughout; the metrics are read with prometheus_client's own parser.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import curl, recv_exactly, socks_session
from tests.support.processes import wait_until
from tests.support.upstreams import TCPUpstream, Upstream
from tests.support.zepproc import ZepProcess, start_zep
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)
from tests.test_admin import scrape, status_of, value
from tests.test_workers import WAIT, worker_tags
from zep.workermetrics import SCRAPE_TIMEOUT

LOAD_DELAY_MS = 1500  # the stand-in's identity load time: long enough to see a worker not ready


@pytest.fixture
def zep2_admin() -> Iterator[ZepProcess]:
    with start_zep("--direct", "--dumpable", "--workers", "2", "--admin", "127.0.0.1:0") as zp:
        yield zp


def slow_identity(tmp_path: Path, upstream: Upstream) -> Path:
    return write_identity(tmp_path / "team.json", [
        service("web", ["web.example.test"], ["80"], f"127.0.0.1:{upstream.port}"),
    ], load_delay_ms=LOAD_DELAY_MS)


def samples_of(samples: dict, worker: str) -> list[str]:
    return [name for name, labels in samples if ("worker", worker) in labels]


def test_not_ready_while_workers_start_ready_once_all_are_then_draining(
        tmp_path: Path, openziti_path: Path, http_a: Upstream, echo: TCPUpstream) -> None:
    identity = slow_identity(tmp_path, http_a)
    with start_zep("--identity", str(identity), "--workers", "2", "--admin", "127.0.0.1:0", "--drain-timeout", "20",
                   extra_pythonpath=[str(openziti_path)], wait_ready=False) as zp:
        line = zp.wait_for_log("listening: admin on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1].split()[0])
        assert status_of(port, "/healthz") == (200, "ok\n")
        assert status_of(port, "/readyz") == (503, "not ready: worker 1 starting, worker 2 starting\n")
        assert "all 2 workers ready" not in zp.log_text()  # still starting when readiness said so
        zp.wait_ready()
        assert zp.admin_port == port and zp.ready_info()["admin"] == f"127.0.0.1:{port}"
        assert status_of(port, "/readyz") == (200, "ready\n")

        with socks_session(zp.socks_port, "127.0.0.1", echo.port) as (sock, reply):
            assert reply == 0
            zp.proc.send_signal(signal.SIGTERM)
            zp.wait_for_log("draining: no new connections; 1 open ones")  # the worker holding the tunnel
            assert status_of(port, "/readyz") == (503, "not ready: draining\n")
            assert status_of(port, "/healthz") == (200, "ok\n")
            sock.sendall(b"still here")
            assert recv_exactly(sock, 10) == b"still here"
        assert zp.proc.wait(WAIT) == 0


def test_metrics_of_both_workers_move_with_their_traffic(zep2_admin: ZepProcess, http_a: Upstream) -> None:
    zp = zep2_admin
    url = f"http://127.0.0.1:{http_a.port}/whoami"
    proxies = {"socks5": f"socks5h://127.0.0.1:{zp.socks_port}", "http": f"http://127.0.0.1:{zp.http_port}"}
    sent = 0
    while worker_tags(zp.access_lines()) != {"1", "2"} or sent < 4:  # both workers have taken some
        for proxy in proxies.values():
            assert curl("--proxy", proxy, url).returncode == 0
            sent += 1
        zp.wait_for_lines(" zep.access: ", sent)
        assert sent < 200, "the kernel gave every connection to one worker"
    samples = scrape(zp)
    for worker in ("1", "2"):
        lines = [line for line in zp.access_lines() if f" worker={worker} " in line]
        for proto in proxies:
            count = sum(f" proto={proto} " in line for line in lines)
            assert value(samples, "zep_exchanges_total", proto=proto, route_kind="direct", outcome="ok",
                         worker=worker) == count
            assert value(samples, "zep_connections_accepted_total", proto=proto, worker=worker) == count
        assert value(samples, "zep_worker_scraped", worker=worker) == 1
        assert value(samples, "zep_worker_restarts_total", worker=worker) == 0
        assert "zep_build_info" in samples_of(samples, worker)
    assert value(samples, "zep_workers") == 2 and value(samples, "zep_workers_up") == 2
    total = sum(v for (name, labels), v in samples.items() if name == "zep_exchanges_total")
    assert total == sent


def test_a_killed_worker_is_not_ready_while_it_restarts_and_its_restart_is_counted(
        tmp_path: Path, openziti_path: Path, http_a: Upstream) -> None:
    """The restarted worker loads its identity again: the whole set is not ready until it has."""
    identity = slow_identity(tmp_path, http_a)
    with start_zep("--identity", str(identity), "--workers", "2", "--admin", "127.0.0.1:0",
                   extra_pythonpath=[str(openziti_path)]) as zp:
        socks = f"socks5h://127.0.0.1:{zp.socks_port}"
        assert curl("-x", socks, "http://web.example.test/whoami").returncode == 0
        old = zp.worker_pids()
        os.kill(old["2"], signal.SIGKILL)
        zp.wait_for_log(f"worker 2 (pid {old['2']}) killed by SIGKILL")
        assert status_of(zp.admin_port, "/readyz") == (503, "not ready: worker 2 restarting\n")
        assert value(scrape(zp), "zep_workers_up") == 1
        pids = wait_until(lambda: (p := zp.worker_pids()) != old and p, "worker 2 ready again", WAIT)
        assert pids["1"] == old["1"] and pids["2"] != old["2"]
        assert status_of(zp.admin_port, "/readyz") == (200, "ready\n")
        samples = scrape(zp)
        assert value(samples, "zep_worker_restarts_total", worker="2") == 1
        assert value(samples, "zep_worker_restarts_total", worker="1") == 0
        assert value(samples, "zep_workers_up") == 2
        assert value(samples, "zep_ziti_identities_loaded", worker="2") == 1  # the new worker's own series


def test_a_worker_that_does_not_answer_is_left_out_of_the_scrape(zep2_admin: ZepProcess) -> None:
    zp = zep2_admin
    stopped = zp.worker_pids()["1"]
    os.kill(stopped, signal.SIGSTOP)  # alive, ready as far as the supervisor knows, and silent
    try:
        samples = scrape(zp)  # answered, within the scrape client's own 10 s
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert value(samples, "zep_worker_scraped", worker="1") == 0
    assert value(samples, "zep_worker_scraped", worker="2") == 1
    assert set(samples_of(samples, "1")) == {"zep_worker_scraped", "zep_worker_restarts_total"}
    assert "zep_build_info" in samples_of(samples, "2")
    zp.wait_for_log(f"did not answer the scrape within {SCRAPE_TIMEOUT:g} s")
    assert value(scrape(zp), "zep_worker_scraped", worker="1") == 1  # answering again once it runs
