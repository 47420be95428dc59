"""The front and a tenant's worker side by side in one event loop (no supervisor, no Ziti: the
tenant's router dials loopback directly): real listeners, real hand-offs with SCM_RIGHTS through the
worker's socket, real clients. A tenant whose worker is not there gets 0x01 / 503 and a log line,
and is served as soon as its worker listens, without anything telling the front."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import curl, read_socks_reply, recv_exactly, socks_connect_request
from tests.support.upstreams import Upstream, http_upstream
from zep import accesslog, relay
from zep.accesslog import AccessEntry
from zep.config import Settings
from zep.dial import DirectDialer
from zep.front import FrontListeners
from zep.passwords import hash_password
from zep.routing import Router
from zep.server import Context, ProxyServer
from zep.tenant_worker import TenantHandoffs
from zep.tenants import Tenant, front_settings

WAIT = 20.0
TEAM_A = Tenant("team-a", "a-ci", hash_password("a-pass"))
TEAM_B = Tenant("team-b", "b-ci", hash_password("b-pass"))
SETTINGS = Settings(socks_port=0, http_port=0, username="", password="", connect_timeout=5.0)


class Loop:
    """An event loop on its own thread, to run zep's servers while the test's clients block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, function, *args):
        async def run():
            return function(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    running.call(relay.start)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def entries() -> Iterator[list[AccessEntry]]:
    seen: list[AccessEntry] = []
    accesslog.subscribe(seen.append)
    try:
        yield seen
    finally:
        accesslog.unsubscribe(seen.append)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with http_upstream("direct") as server:
        yield server


def start_worker(loop: Loop, tenant: Tenant, path: str) -> ProxyServer:
    def build() -> ProxyServer:
        settings = tenant.worker_settings(dataclasses.replace(SETTINGS, fallback="direct"), {})
        server = ProxyServer(Context(settings, Router([], DirectDialer(), settings.connect_timeout), relay.relay,
                                     None))
        TenantHandoffs(tenant, path).open(server)
        return server

    return loop.call(build)


def start_front(loop: Loop, sockets: dict[str, str]) -> tuple[int, int]:
    def build() -> tuple[int, int]:
        settings = front_settings(SETTINGS)
        server = ProxyServer(Context(settings, Router([], None, settings.connect_timeout), relay.relay, None))
        socks, http = FrontListeners([TEAM_A, TEAM_B], sockets).open(server)
        return int(socks.rsplit(":", 1)[1]), int(http.rsplit(":", 1)[1])

    return loop.call(build)


def wait_for(entries: list[AccessEntry], **fields) -> AccessEntry:
    """The first access entry with these fields (entries are written when a connection ends)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for entry in list(entries):
            if all(getattr(entry, name) == value for name, value in fields.items()):
                return entry
        time.sleep(0.02)
    raise AssertionError(f"no access entry with {fields} among {entries}")


def socks_reply(port: int, user: str, password: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(b"\x05\x01\x02" + b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)])
                     + password.encode() + socks_connect_request("127.0.0.1", 9))
        assert recv_exactly(sock, 4) == b"\x05\x02\x01\x00"
        return read_socks_reply(sock)[0]


def test_the_front_hands_each_login_to_its_tenant_s_worker_or_says_it_is_down(
        loop: Loop, entries: list[AccessEntry], upstream: Upstream, tmp_path: Path) -> None:
    paths = {"team-a": str(tmp_path / "team-a.sock"), "team-b": str(tmp_path / "team-b.sock")}
    start_worker(loop, TEAM_A, paths["team-a"])
    socks, http = start_front(loop, paths)
    url = f"http://{upstream.authority}/whoami"

    for proxy in (["--proxy", f"socks5h://a-ci:a-pass@127.0.0.1:{socks}"],
                  ["--proxy", f"http://127.0.0.1:{http}", "--proxy-user", "a-ci:a-pass"],
                  ["--proxy", f"http://127.0.0.1:{http}", "--proxy-user", "a-ci:a-pass", "--proxytunnel"]):
        result = curl(*proxy, url)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["server"] == "direct"
    served = wait_for(entries, tenant="team-a", proto="http", method="GET")
    assert (served.route, served.user, served.status) == ("direct", "a-ci", 200)

    # team B's worker is not listening: its clients are told at once, team A's are not affected
    assert socks_reply(socks, "b-ci", "b-pass") == 0x01
    result = curl("--proxy", f"http://127.0.0.1:{http}", "--proxy-user", "b-ci:b-pass", "--write-out",
                  "%{http_code}", "--output", "/dev/null", url)
    assert result.stdout == b"503"
    refused = wait_for(entries, tenant="team-b", status=503)
    assert refused.detail == "the worker of tenant team-b is not available" and refused.user == "b-ci"
    assert wait_for(entries, tenant="team-b", proto="socks5").user == "b-ci"

    # its worker comes up: the front finds it on the next connection
    start_worker(loop, TEAM_B, paths["team-b"])
    result = curl("--proxy", f"socks5h://b-ci:b-pass@127.0.0.1:{socks}", url)
    assert result.returncode == 0, result.stderr
    assert wait_for(entries, tenant="team-b", route="direct").user == "b-ci"
    with socket.create_connection(("127.0.0.1", socks), timeout=WAIT) as sock:  # a wrong password: the front says no
        sock.sendall(b"\x05\x01\x02\x01\x04b-ci\x06a-pass")
        assert recv_exactly(sock, 4) == b"\x05\x02\x01\x01"
