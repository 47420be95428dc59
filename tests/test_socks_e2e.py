"""SOCKS5 through a real `zep serve`, with real clients (curl, requests + PySocks, httpx + socksio)."""

from __future__ import annotations

import signal
import socket
import struct
import time

import httpx
import pytest
import requests

from tests.support.clients import (
    blackhole_port,
    curl,
    curl_sha256,
    read_socks_reply,
    recv_exactly,
    recv_until_eof,
    socks_connect_request,
    socks_session,
)
from tests.support.upstreams import closed_port, payload, sha256
from tests.support.zepproc import start_zep

BIG = 64 * 1024 * 1024


def test_curl_socks5h_big_download_is_byte_exact(zep, http_a, tmp_path):
    code, digest = curl_sha256(f"http://localhost:{http_a.port}/bytes/{BIG}",
                               "--socks5-hostname", f"127.0.0.1:{zep.socks_port}", out=tmp_path / "out")
    assert code == 0, digest
    assert digest == sha256(payload(BIG))
    line = zep.wait_for_log(f"target=localhost:{http_a.port}")
    assert "proto=socks5" in line and "route=direct" in line and "outcome=ok" in line
    assert f"down={BIG}" not in line  # the count includes the response head too
    down = int(line.split(" down=")[1].split()[0])
    assert down > BIG


def test_curl_socks5_local_resolution_posts_body(zep, http_a, tmp_path):
    body = payload(3 * 1024 * 1024, seed=3)
    (tmp_path / "body").write_bytes(body)
    result = curl("--socks5", f"127.0.0.1:{zep.socks_port}", "--data-binary", f"@{tmp_path / 'body'}",
                  f"http://127.0.0.1:{http_a.port}/sha256")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f'{{"sha256": "{sha256(body)}", "length": {len(body)}}}'


def test_curl_https_through_socks5h(zep, https_upstream, ca_file, tmp_path):
    size = 5 * 1024 * 1024
    code, digest = curl_sha256(f"https://127.0.0.1:{https_upstream.port}/bytes/{size}", "--cacert", str(ca_file),
                               "--proxy", f"socks5h://127.0.0.1:{zep.socks_port}", out=tmp_path / "out")
    assert code == 0, digest
    assert digest == sha256(payload(size))


def test_curl_socks5_with_credentials(zep_auth, http_a):
    ok = curl("--proxy", f"socks5h://alice:s3cret@127.0.0.1:{zep_auth.socks_port}", f"http://127.0.0.1:{http_a.port}/whoami")
    assert ok.returncode == 0, ok.stderr
    assert b'"server": "a"' in ok.stdout
    assert "user=alice" in zep_auth.wait_for_log("user=alice")


def test_curl_socks5_wrong_credentials_rejected(zep_auth, http_a):
    bad = curl("--proxy", f"socks5h://alice:wrong@127.0.0.1:{zep_auth.socks_port}", f"http://127.0.0.1:{http_a.port}/whoami")
    assert bad.returncode == 97  # CURLE_PROXY: the SOCKS handshake failed
    line = zep_auth.wait_for_log("outcome=auth-failed")
    assert "wrong" not in line  # the password never reaches the log


def test_socks5_without_credentials_when_required(zep_auth):
    with socket.create_connection(("127.0.0.1", zep_auth.socks_port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_until_eof(sock) == b"\x05\xff"


def test_wrong_password_reply_bytes(zep_auth, http_a):
    with socket.create_connection(("127.0.0.1", zep_auth.socks_port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x05alice\x04nope")
        assert recv_until_eof(sock) == b"\x01\x01"


def test_requests_with_pysocks(zep, http_a, http_b):
    proxies = {"http": f"socks5h://127.0.0.1:{zep.socks_port}"}
    with requests.Session() as client:
        for upstream in (http_a, http_b):
            reply = client.get(f"http://localhost:{upstream.port}/whoami", proxies=proxies, timeout=10)
            assert reply.status_code == 200
            assert reply.json()["server"] == upstream.name


def test_httpx_with_socksio(zep, http_b):
    size = 2 * 1024 * 1024
    with httpx.Client(proxy=f"socks5://127.0.0.1:{zep.socks_port}", timeout=10) as client:
        reply = client.get(f"http://127.0.0.1:{http_b.port}/bytes/{size}")
    assert reply.status_code == 200
    assert sha256(reply.content) == sha256(payload(size))


def test_success_reply_carries_upstream_bound_address(zep, echo):
    with socks_session(zep.socks_port, echo.host, echo.port) as (sock, reply):
        assert reply == 0
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    with socket.create_connection(("127.0.0.1", zep.socks_port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        recv_exactly(sock, 2)
        sock.sendall(socks_connect_request(echo.host, echo.port))
        reply, host, port = read_socks_reply(sock)
        assert (reply, host) == (0, "127.0.0.1")
        assert port not in (0, echo.port, zep.socks_port)


def test_ipv6_literal_target(zep):
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.fail("IPv6 loopback is not available on this machine")
    with listener:
        port = listener.getsockname()[1]
        with socks_session(zep.socks_port, "::1", port) as (sock, reply):
            assert reply == 0
            conn, _ = listener.accept()
            with conn:
                sock.sendall(b"six")
                assert recv_exactly(conn, 3) == b"six"


def test_pipelined_handshake_and_early_data(zep, echo):
    """Greeting, request and the first payload bytes in one write: nothing is lost."""
    with socket.create_connection(("127.0.0.1", zep.socks_port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00" + socks_connect_request(echo.host, echo.port) + b"early bytes")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        reply, _host, _port = read_socks_reply(sock)
        assert reply == 0
        assert recv_exactly(sock, 11) == b"early bytes"


def test_half_close_client_to_upstream(zep, half_close):
    data = payload(1024 * 1024, seed=11)
    with socks_session(zep.socks_port, half_close.host, half_close.port) as (sock, reply):
        assert reply == 0
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == sha256(data).encode()


def test_half_close_upstream_to_client(zep, speak_first):
    with socks_session(zep.socks_port, speak_first.host, speak_first.port) as (sock, reply):
        assert reply == 0
        assert recv_until_eof(sock) == b"hello from upstream"
        sock.sendall(b"still talking after your EOF")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        assert sock.recv(1) == b""
    zep.wait_for_log(f"target=127.0.0.1:{speak_first.port}")
    # The server's thread stores what it read once it sees EOF, which may be after zep's log line.
    deadline = time.monotonic() + 5
    while b"still talking after your EOF" not in speak_first.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"still talking after your EOF" in speak_first.received


def test_a_client_that_resets_after_the_whole_download_is_ok(zep, speak_first):
    """The exchange completed (the upstream's EOF reached the client) even if the client then
    resets instead of closing, as npm and apt do: `ok`, not a client error."""
    with socks_session(zep.socks_port, speak_first.host, speak_first.port) as (sock, reply):
        assert reply == 0
        mark = zep.client_mark(sock)
        assert recv_until_eof(sock) == b"hello from upstream"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    line = zep.wait_for_client(mark)
    assert "outcome=ok" in line, line


def test_a_client_that_resets_mid_download_is_a_client_error(zep, echo):
    with socks_session(zep.socks_port, echo.host, echo.port) as (sock, reply):
        assert reply == 0
        mark = zep.client_mark(sock)
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    line = zep.wait_for_client(mark)
    assert "outcome=client-error" in line, line


@pytest.mark.parametrize("command", [2, 3, 9])
def test_bind_udp_and_unknown_commands_get_0x07(zep, echo, command):
    with socket.create_connection(("127.0.0.1", zep.socks_port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        recv_exactly(sock, 2)
        sock.sendall(socks_connect_request(echo.host, echo.port, command=command))
        assert read_socks_reply(sock)[0] == 0x07
        assert recv_until_eof(sock) == b""


def test_unknown_address_type_gets_0x08(zep):
    with socket.create_connection(("127.0.0.1", zep.socks_port), timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        recv_exactly(sock, 2)
        sock.sendall(b"\x05\x01\x00\x07" + b"\x00" * 6)
        assert read_socks_reply(sock)[0] == 0x08


def test_refused_target_gets_0x05(zep):
    port = closed_port()
    with socks_session(zep.socks_port, "127.0.0.1", port) as (_sock, reply):
        assert reply == 0x05
    line = zep.wait_for_log(f"target=127.0.0.1:{port}")
    assert "outcome=dial-failed" in line


def test_unresolvable_name_gets_0x04(zep):
    name = "a" * 64 + ".example"  # an over-long label fails in the resolver, with no query sent
    with socks_session(zep.socks_port, name, 80) as (_sock, reply):
        assert reply == 0x04


def test_not_a_socks_client_is_closed(zep):
    with socket.create_connection(("127.0.0.1", zep.socks_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert recv_until_eof(sock) == b""
    zep.wait_for_log("outcome=bad-request")


def test_connect_timeout_gets_0x06(relay_impl, driver):
    with start_zep("--direct", "--connect-timeout", "0.5", relay=relay_impl, driver=driver) as zp, blackhole_port() as port:
        with socks_session(zp.socks_port, "127.0.0.1", port) as (_sock, reply):
            assert reply == 0x06
        assert "outcome=dial-timeout" in zp.wait_for_log(f"target=127.0.0.1:{port}")


def test_handshake_timeout_closes_silent_clients(relay_impl, driver):
    with start_zep("--direct", "--handshake-timeout", "0.3", relay=relay_impl, driver=driver) as zp:
        with socket.create_connection(("127.0.0.1", zp.socks_port), timeout=10) as sock:
            sock.sendall(b"\x05")  # a greeting that never completes
            assert sock.recv(1) == b""
        assert "no complete SOCKS5 request" in zp.wait_for_log("proto=socks5")


def test_tunnel_idle_timeout(relay_impl, driver, echo):
    with start_zep("--direct", "--tunnel-timeout", "0.5", relay=relay_impl, driver=driver) as zp:
        with socks_session(zp.socks_port, echo.host, echo.port) as (sock, reply):
            assert reply == 0
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):  # cut, not finished: a reset, not a FIN
                sock.recv(1)
        assert "outcome=tunnel-timeout" in zp.wait_for_log(f"target=127.0.0.1:{echo.port}")


def test_connections_over_maxconn_are_refused_promptly(relay_impl, driver, echo):
    with start_zep("--direct", "--maxconn", "2", relay=relay_impl, driver=driver) as zp:
        with socks_session(zp.socks_port, echo.host, echo.port) as (first, _), \
                socks_session(zp.socks_port, echo.host, echo.port) as (second, _):
            with socket.create_connection(("127.0.0.1", zp.socks_port), timeout=5) as third:
                assert third.recv(1) == b""
            assert "maxconn 2 reached" in zp.wait_for_log("outcome=refused")
            first.sendall(b"x")
            assert recv_exactly(first, 1) == b"x"  # the admitted ones are untouched
        # capacity comes back once they close
        zp.wait_for_log(f"target=127.0.0.1:{echo.port}")
        with socks_session(zp.socks_port, echo.host, echo.port) as (fourth, reply):
            assert reply == 0


def test_second_sigterm_ends_open_tunnels_at_once_and_logs_them(relay_impl, driver, echo):
    with start_zep("--direct", relay=relay_impl, driver=driver) as zp:
        with socks_session(zp.socks_port, echo.host, echo.port) as (sock, reply):
            assert reply == 0
            sock.sendall(b"12345")
            assert recv_exactly(sock, 5) == b"12345"
            zp.proc.send_signal(signal.SIGTERM)  # the first one drains: the tunnel may go on
            zp.wait_for_log("draining: no new connections; 1 open ones")
            sock.sendall(b"678")
            assert recv_exactly(sock, 3) == b"678"
            assert zp.stop() == 0  # the second one stops at once
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        line = zp.wait_for_log("outcome=cancelled")
        assert "up=8 down=8" in line
