"""A client speaking the wrong protocol on a port, bytes shown as text, a port already taken:
each gets a log line or an error that says exactly that."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.support.clients import curl, socks_connect_request
from tests.support.upstreams import Upstream
from tests.support.zepproc import ZepProcess, error_line, run_zep, start_zep


@pytest.mark.parametrize(("listener", "setting"), [("socks", "SOCKS_PORT/--socks-port"), ("http", "HTTP_PORT/--http-port")])
def test_address_in_use_names_the_setting_and_suggests_0(listener: str, setting: str) -> None:
    with start_zep("--direct") as zp:
        taken = zp.socks_port if listener == "socks" else zp.http_port
        other = "--http-port" if listener == "socks" else "--socks-port"
        line = error_line(run_zep("serve", "--direct", f"--{listener}-port", str(taken), other, "0"))
    assert line == (f"zep: error: cannot listen on 127.0.0.1:{taken}: address in use: "
                    f"set {setting} to another port, or to 0 for any free one")


# ------------------------------------------------------------------ the wrong protocol on a port


@pytest.fixture(scope="module")
def zep_open() -> Iterator[ZepProcess]:
    with start_zep("--direct") as zp:  # no credentials (zep_env empties them)
        yield zp


@pytest.mark.parametrize(("port", "proxy", "reason"), [
    ("socks", "http://127.0.0.1:{}", "an HTTP request on the SOCKS5 port"),
    ("socks", "https://127.0.0.1:{}", "a TLS handshake on the SOCKS5 port"),
    ("socks", "socks4://127.0.0.1:{}", "a SOCKS4 client on the SOCKS5 port"),
    ("http", "socks5h://127.0.0.1:{}", "a SOCKS5 client on the HTTP proxy port"),
    ("http", "socks4://127.0.0.1:{}", "a SOCKS4 client on the HTTP proxy port"),
    ("http", "https://127.0.0.1:{}", "a TLS handshake on the HTTP proxy port"),
])
def test_wrong_protocol_on_a_port_is_logged_as_such(zep_open: ZepProcess, http_a: Upstream,
                                                    port: str, proxy: str, reason: str) -> None:
    number = zep_open.socks_port if port == "socks" else zep_open.http_port
    before = len(zep_open.access_lines())
    result = curl("--max-time", "10", "-x", proxy.format(number), f"http://localhost:{http_a.port}/whoami")
    assert result.returncode != 0
    line = zep_open.wait_for_log(f'detail="{reason}')
    assert "outcome=bad-request" in line
    assert len(zep_open.access_lines()) == before + 1


def test_errors_show_text_not_bytes_reprs(zep_open: ZepProcess) -> None:
    with socket.create_connection(("127.0.0.1", zep_open.socks_port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(socks_connect_request("bad\x01name\xff", 80))
        sock.recv(64)
    line = zep_open.wait_for_log("unusable domain name")
    assert 'unusable domain name \\"bad\\\\x01name\\\\xc3\\\\xbf\\"' in line  # logfmt doubles the backslash
    with socket.create_connection(("127.0.0.1", zep_open.http_port), timeout=10) as sock:
        sock.sendall(b"GET /path?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    line = zep_open.wait_for_log("is not an absolute URL")
    assert 'request target \\"/path\\" is not an absolute URL' in line
    assert "s3cret" not in zep_open.log_text() and "b'" not in zep_open.log_text()


