"""The fallback route through an upstream proxy, end to end: an HTTP CONNECT proxy on loopback,
another zep as a SOCKS5 upstream, and microsocks when it is installed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support.clients import access_needle, blackhole_port, curl, recv_exactly, recv_head, socks_session
from tests.support.connect_proxy import EARLY_BYTES, ConnectProxy, connect_proxy
from tests.support.upstreams import Upstream, closed_port
from tests.support.zepproc import ZepProcess, start_zep

PROXY_USER, PROXY_SECRET = "ci-bot", "pr0xy-s3cret-value"
MICROSOCKS_START_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def corp_proxy() -> Iterator[ConnectProxy]:
    with connect_proxy(PROXY_USER, PROXY_SECRET, blocked={"blocked.example"}) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def zep_via_http(corp_proxy: ConnectProxy, http_b: Upstream) -> Iterator[ZepProcess]:
    env = {"ZEP_UPSTREAM_PROXY": corp_proxy.url(), "ZEP_UPSTREAM_NO_PROXY": f"127.0.0.1:{http_b.port}, .direct.test",
           "ZEP_EGRESS": "deny *.denied.test; allow *"}
    with start_zep("--direct", "--log-level", "debug", "--connect-timeout", "2", env=env) as zp:
        yield zp


def via(zp: ZepProcess, listener: str) -> list[str]:
    return ["--socks5-hostname", f"127.0.0.1:{zp.socks_port}"] if listener == "socks5" else ["-x", f"http://127.0.0.1:{zp.http_port}"]


def socks_reply(zp: ZepProcess, host: str, port: int) -> int:
    with socks_session(zp.socks_port, host, port) as (_sock, reply):
        return reply


def http_connect_status(zp: ZepProcess, host: str, port: int) -> int:
    with socket.create_connection(("127.0.0.1", zp.http_port), timeout=10) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = recv_head(sock)
    return int(head.split(b" ", 2)[1])


# ----------------------------------------------------------------------------- HTTP CONNECT upstream

@pytest.mark.parametrize("listener", ["socks5", "http"])
@pytest.mark.parametrize("tunnel", [False, True])
def test_the_http_proxy_carries_the_fallback_traffic(zep_via_http, corp_proxy, http_a, listener, tunnel):
    before = len(corp_proxy.connects)
    args = ["-p"] if tunnel and listener == "http" else []
    result = curl(*args, *via(zep_via_http, listener), f"http://localhost:{http_a.port}/whoami")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"] == "a"
    assert corp_proxy.connects[before:] == [f"localhost:{http_a.port}"]  # the name, unresolved
    line = zep_via_http.wait_for_log(f"target=localhost:{http_a.port} route=proxy")
    assert "outcome=ok" in line


def test_no_proxy_exceptions_go_direct(zep_via_http, corp_proxy, http_b, http_a):
    before = len(corp_proxy.connects)
    for listener in ("socks5", "http"):
        result = curl(*via(zep_via_http, listener), f"http://127.0.0.1:{http_b.port}/whoami")
        assert result.returncode == 0 and json.loads(result.stdout)["server"] == "b"
    assert corp_proxy.connects[before:] == []
    assert "route=direct" in zep_via_http.wait_for_log(f"target=127.0.0.1:{http_b.port} ")
    # host:port exceptions are per port: the same host on another port goes through the proxy.
    assert curl(*via(zep_via_http, "socks5"), f"http://127.0.0.1:{http_a.port}/whoami").returncode == 0
    assert corp_proxy.connects[before:] == [f"127.0.0.1:{http_a.port}"]


def test_egress_policy_applies_before_the_proxy(zep_via_http, corp_proxy):
    accepted = corp_proxy.accepted
    assert socks_reply(zep_via_http, "ci.denied.test", 443) == 0x02
    assert http_connect_status(zep_via_http, "ci.denied.test", 443) == 403
    assert socks_reply(zep_via_http, "169.254.169.254", 80) == 0x02
    assert corp_proxy.accepted == accepted  # decided without asking the proxy
    line = zep_via_http.wait_for_log("target=ci.denied.test:443 ")
    assert "route=deny" in line and 'egress rule 1 \\"deny *.denied.test\\"' in line


@pytest.mark.parametrize(("host", "reply", "status", "detail"), [
    ("blocked.example", 0x02, 403, "answered CONNECT blocked.example:443 with 403"),
    ("status-502.test", 0x04, 502, "with 502"),
    ("status-503.test", 0x01, 502, "with 503"),
    ("status-504.test", 0x06, 504, "with 504"),
    ("status-404.test", 0x01, 502, "with 404"),
    ("garbage.test", 0x01, 502, "answered CONNECT with something that is not HTTP"),
    ("unreachable.example", 0x04, 502, "with 502"),  # the test proxy cannot reach it
])
def test_proxy_answers_map_onto_the_usual_failures(zep_via_http, host, reply, status, detail):
    assert socks_reply(zep_via_http, host, 443) == reply
    assert http_connect_status(zep_via_http, host, 443) == status
    line = zep_via_http.wait_for_log(f"proto=socks5 target={host}:443 ")
    assert f"upstream proxy http://127.0.0.1:" in line and detail in line


def test_the_connect_timeout_covers_the_proxy_handshake(zep_via_http):
    assert socks_reply(zep_via_http, "silent.test", 443) == 0x06  # the client's own 10 s timeout would raise
    line = zep_via_http.wait_for_log("target=silent.test:443 ")
    assert "outcome=dial-timeout" in line and "did not connect silent.test:443 within 2s" in line


def test_bytes_after_the_connect_answer_reach_the_client_first(corp_proxy, relay_impl):
    with start_zep("--direct", relay=relay_impl, env={"ZEP_UPSTREAM_PROXY": corp_proxy.url()}) as zp:
        with socks_session(zp.socks_port, "early.test", 25) as (sock, reply):
            assert reply == 0x00
            assert recv_exactly(sock, len(EARLY_BYTES)) == EARLY_BYTES
            sock.sendall(b"EHLO zep\r\n")
            assert recv_exactly(sock, 10) == b"EHLO zep\r\n"
        assert f"down={len(EARLY_BYTES) + 10} " in zp.wait_for_log("target=early.test:25 ")


def test_wrong_credentials_are_general_failures_with_a_clear_detail(corp_proxy, http_a):
    for url, detail in [(corp_proxy.url(password="wrong-secret"), "upstream proxy refused zep's credentials"),
                        (corp_proxy.url(username=""), "asks for credentials and none are configured")]:
        with start_zep("--direct", env={"ZEP_UPSTREAM_PROXY": url}) as zp:
            assert socks_reply(zp, "127.0.0.1", http_a.port) == 0x01
            result = curl(*via(zp, "http"), "-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{http_a.port}/")
            assert result.stdout == b"502"
            assert detail in zp.wait_for_log(f"proto=socks5 target=127.0.0.1:{http_a.port} ")
        assert "wrong-secret" not in zp.log_text()


@pytest.mark.parametrize(("make_port", "reply", "detail"), [
    ("closed", 0x01, "cannot be reached: connect to 127.0.0.1:{port} failed: Connection refused"),
    ("blackhole", 0x06, "did not connect 127.0.0.1:"),
])
def test_an_unreachable_proxy_is_named_not_the_destination(http_a, make_port, reply, detail):
    with blackhole_port() as hole:
        port = closed_port() if make_port == "closed" else hole
        url = f"http://{PROXY_USER}:{PROXY_SECRET}@127.0.0.1:{port}"
        with start_zep("--direct", "--connect-timeout", "1", env={"ZEP_UPSTREAM_PROXY": url}) as zp:
            assert socks_reply(zp, "127.0.0.1", http_a.port) == reply
            line = zp.wait_for_log(f"target=127.0.0.1:{http_a.port} ")
    assert f"upstream proxy http://127.0.0.1:{port}" in line and detail.format(port=port) in line
    assert PROXY_SECRET not in zp.log_text()


def test_credentials_never_reach_the_log(zep_via_http, http_a):
    assert curl(*via(zep_via_http, "http"), f"http://localhost:{http_a.port}/whoami").returncode == 0
    zep_via_http.wait_for_log(access_needle("http", f"localhost:{http_a.port}"))
    text = zep_via_http.log_text()
    assert "through the upstream proxy http://127.0.0.1:" in text
    assert PROXY_SECRET not in text and PROXY_USER not in text


def test_fallback_proxy_without_an_upstream_exits_2():
    from tests.support.zepproc import run_zep

    result = run_zep("serve", "--direct", "--fallback", "proxy")
    assert result.returncode == 2 and "needs an upstream proxy" in result.stderr
    bad = run_zep("serve", "--direct", env={"ZEP_UPSTREAM_PROXY": f"ftp://u:{PROXY_SECRET}@h:1"})
    assert bad.returncode == 2 and "ZEP_UPSTREAM_PROXY" in bad.stderr and PROXY_SECRET not in bad.stderr


# ----------------------------------------------------------------------------- SOCKS5 upstreams

@pytest.fixture(scope="module")
def socks_upstream() -> Iterator[ZepProcess]:
    """Another zep as the SOCKS5 upstream: with credentials, and its own egress rule."""
    env = {"PROXY_USERNAME": "upstream-user", "PROXY_PASSWORD": "upstream-pass", "ZEP_EGRESS": "deny *.denied-upstream.test"}
    with start_zep("--direct", "--connect-timeout", "1", env=env) as zp:
        yield zp


@pytest.fixture(scope="module")
def zep_via_socks(socks_upstream: ZepProcess) -> Iterator[ZepProcess]:
    url = f"socks5h://upstream-user:upstream-pass@127.0.0.1:{socks_upstream.socks_port}"
    with start_zep("--direct", "--connect-timeout", "5", env={"ZEP_UPSTREAM_PROXY": url}) as zp:
        yield zp


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_a_socks5_upstream_carries_the_fallback_traffic(zep_via_socks, socks_upstream, http_a, listener):
    result = curl(*via(zep_via_socks, listener), f"http://localhost:{http_a.port}/whoami")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"] == "a"
    assert "route=proxy" in zep_via_socks.wait_for_log(access_needle(listener, f"localhost:{http_a.port}"))
    # The upstream got the name unresolved, and zep's credentials.
    line = socks_upstream.wait_for_log(f"target=localhost:{http_a.port} ")
    assert "user=upstream-user" in line and "route=direct" in line


def test_socks5_upstream_replies_map_onto_the_same_failures(zep_via_socks, socks_upstream):
    refused = closed_port()
    with blackhole_port() as hole:
        cases = [("ci.denied-upstream.test", 443, 0x02, 403), ("127.0.0.1", refused, 0x05, 502),
                 ("127.0.0.1", hole, 0x06, 504), ("no-such-host.invalid", 80, 0x04, 502)]
        for host, port, reply, status in cases:
            assert socks_reply(zep_via_socks, host, port) == reply, host
            assert http_connect_status(zep_via_socks, host, port) == status, host
            line = zep_via_socks.wait_for_log(f"proto=socks5 target={host}:{port} ")
            assert f"SOCKS5 reply {reply:#04x}" in line


def test_a_destination_that_speaks_first_through_a_socks5_upstream(zep_via_socks, speak_first):
    """Its greeting may arrive in the same read as the upstream's reply: the client gets it either way."""
    with socks_session(zep_via_socks.socks_port, "127.0.0.1", speak_first.port) as (sock, reply):
        assert reply == 0x00
        assert recv_exactly(sock, 19) == b"hello from upstream"
        assert sock.recv(1) == b""  # and then the destination's half-close


def test_socks5_upstream_refusing_credentials(socks_upstream, http_a):
    url = f"socks5h://upstream-user:not-the-password@127.0.0.1:{socks_upstream.socks_port}"
    with start_zep("--direct", env={"ZEP_UPSTREAM_PROXY": url}) as zp:
        assert socks_reply(zp, "127.0.0.1", http_a.port) == 0x01
        assert "upstream proxy refused zep's credentials" in zp.wait_for_log(f"target=127.0.0.1:{http_a.port} ")
    assert "not-the-password" not in zp.log_text()


@pytest.fixture(scope="module")
def microsocks() -> Iterator[int]:
    binary = shutil.which("microsocks")
    if binary is None:
        pytest.skip("microsocks is not installed (.ci/run installs it)")
    port = closed_port()
    proc = subprocess.Popen([binary, "-i", "127.0.0.1", "-p", str(port), "-u", "micro", "-P", "micro-pass"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + MICROSOCKS_START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("microsocks did not start listening") from None
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_microsocks_as_the_upstream(microsocks, http_a, listener):
    url = f"socks5h://micro:micro-pass@127.0.0.1:{microsocks}"
    with start_zep("--direct", env={"ZEP_UPSTREAM_PROXY": url}) as zp:
        result = curl(*via(zp, listener), f"http://localhost:{http_a.port}/bytes/100000", "-o", "/dev/null",
                      "-w", "%{size_download}")
        assert result.returncode == 0 and result.stdout == b"100000", result.stderr
        assert "route=proxy" in zp.wait_for_log(access_needle(listener, f"localhost:{http_a.port}"))
        assert socks_reply(zp, "127.0.0.1", closed_port()) == 0x05
