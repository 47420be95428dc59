"""The HTTP proxy through a real `zep serve`: forwarding, CONNECT, auth and every error status."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import httpx
import pytest
import requests

from tests.support.clients import blackhole_port, curl, curl_sha256, recv_exactly, recv_until_eof
from tests.support.upstreams import closed_port, payload, sha256
from tests.support.zepproc import start_zep

BIG = 64 * 1024 * 1024


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length framed response from a raw socket."""
    head = b""
    while b"\r\n\r\n" not in head:
        block = sock.recv(1)
        if not block:
            raise ConnectionError(f"closed inside a response head: {head!r}")
        head += block
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    body = recv_exactly(sock, int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def proxy_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return read_response(sock)


def test_curl_plain_http_big_download(zep, http_a, tmp_path):
    code, digest = curl_sha256(f"http://127.0.0.1:{http_a.port}/bytes/{BIG}", "-x", f"http://127.0.0.1:{zep.http_port}",
                               out=tmp_path / "out")
    assert code == 0, digest
    assert digest == sha256(payload(BIG))
    line = zep.wait_for_log(f"proto=http method=GET target=http://127.0.0.1:{http_a.port} path=/bytes/{BIG} status=200")
    assert "route=direct" in line and "outcome=ok" in line


def test_curl_post_body_with_length_and_chunked(zep, http_a, tmp_path):
    body = payload(5 * 1024 * 1024, seed=5)
    (tmp_path / "body").write_bytes(body)
    expected = {"sha256": sha256(body), "length": len(body)}
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        result = curl("-x", f"http://127.0.0.1:{zep.http_port}", *extra, "--data-binary", f"@{tmp_path / 'body'}",
                      f"http://127.0.0.1:{http_a.port}/sha256")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected


def test_chunked_and_close_delimited_responses(zep, http_a, tmp_path):
    size = 3 * 1024 * 1024 + 17
    for kind in ("chunked", "close"):
        code, digest = curl_sha256(f"http://127.0.0.1:{http_a.port}/{kind}/{size}",
                                   "-x", f"http://127.0.0.1:{zep.http_port}", out=tmp_path / kind)
        assert code == 0, digest
        assert digest == sha256(payload(size))


def test_curl_https_through_connect(zep, https_upstream, ca_file, tmp_path):
    size = 8 * 1024 * 1024
    code, digest = curl_sha256(f"https://127.0.0.1:{https_upstream.port}/bytes/{size}", "--cacert", str(ca_file),
                               "-x", f"http://127.0.0.1:{zep.http_port}", out=tmp_path / "out")
    assert code == 0, digest
    assert digest == sha256(payload(size))
    assert "proto=http" in zep.wait_for_log(f"target=127.0.0.1:{https_upstream.port}")


def test_connect_with_pipelined_bytes(zep, echo):
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode()
                     + b"client hello right behind the request")
        expected = b"HTTP/1.1 200 Connection established\r\n\r\n" + b"client hello right behind the request"
        assert recv_exactly(sock, len(expected)) == expected


def test_keep_alive_routes_each_request_on_its_own(zep, http_a, http_b):
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        for upstream in (http_a, http_b, http_a):
            sock.sendall(f"GET http://127.0.0.1:{upstream.port}/whoami HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode())
            status, headers, body = read_response(sock)
            assert status == 200
            assert headers["connection"] == "keep-alive"
            assert json.loads(body)["server"] == upstream.name
        client = f"client=127.0.0.1:{sock.getsockname()[1]} "
    deadline = time.monotonic() + 10
    while len(lines := [line for line in zep.access_lines() if client in line]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # the third line is written just after its response went out
    targets = [line.split(" target=")[1].split()[0] for line in lines]
    assert targets == [f"http://127.0.0.1:{u.port}" for u in (http_a, http_b, http_a)]  # one line per request


def test_pipelined_requests_answered_in_order(zep, http_a, http_b):
    requests_bytes = b"".join(
        f"GET http://127.0.0.1:{u.port}/whoami HTTP/1.1\r\nHost: x\r\n\r\n".encode() for u in (http_b, http_a))
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        sock.sendall(requests_bytes)
        assert json.loads(read_response(sock)[2])["server"] == "b"
        assert json.loads(read_response(sock)[2])["server"] == "a"


def test_origin_gets_origin_form_without_proxy_headers(zep_auth, http_a):
    result = curl("-x", f"http://alice:s3cret@127.0.0.1:{zep_auth.http_port}", "-H", "Proxy-Connection: keep-alive",
                  "-H", "Connection: X-Secret", "-H", "X-Secret: hop", "-H", "X-Kept: end-to-end",
                  f"http://127.0.0.1:{http_a.port}/whoami?q=1")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["path"] == "/whoami?q=1"
    names = {name.lower() for name in seen["headers"]}
    assert "proxy-authorization" not in names and "proxy-connection" not in names and "x-secret" not in names
    assert seen["headers"]["X-Kept"] == "end-to-end"


def test_407_without_credentials(zep_auth, http_a):
    status, headers, _body = proxy_request(
        zep_auth.http_port, f"GET http://127.0.0.1:{http_a.port}/whoami HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 407
    assert headers["proxy-authenticate"] == 'Basic realm="zep"'
    line = zep_auth.wait_for_log("no proxy credentials")
    assert "outcome=auth-failed" in line and f"target=http://127.0.0.1:{http_a.port} path=/whoami status=407" in line


def test_wrong_credentials_rejected_by_curl(zep_auth, https_upstream, ca_file):
    result = curl("-x", f"http://alice:nope@127.0.0.1:{zep_auth.http_port}", "--cacert", str(ca_file),
                  "--write-out", "%{http_connect}", f"https://127.0.0.1:{https_upstream.port}/whoami")
    assert result.returncode != 0
    assert result.stdout.endswith(b"407")
    assert "nope" not in zep_auth.log_text()


def test_requests_and_httpx_through_http_proxy_with_auth(zep_auth, http_a, https_upstream, ca_file):
    proxy = f"http://alice:s3cret@127.0.0.1:{zep_auth.http_port}"
    with requests.Session() as client:
        reply = client.get(f"http://127.0.0.1:{http_a.port}/whoami", proxies={"http": proxy}, timeout=10)
        assert reply.json()["server"] == "a"
        reply = client.get(f"https://127.0.0.1:{https_upstream.port}/whoami", proxies={"https": proxy},
                           verify=str(ca_file), timeout=10)
        assert reply.json()["server"] == "tls"
    with httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=ca_file), timeout=10) as client:
        assert client.get(f"https://127.0.0.1:{https_upstream.port}/whoami").json()["server"] == "tls"
        assert client.get(f"http://127.0.0.1:{http_a.port}/whoami").json()["server"] == "a"


def test_head_request(zep, http_a):
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        sock.sendall(f"HEAD http://127.0.0.1:{http_a.port}/bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 1000" in head
        sock.sendall(f"GET http://127.0.0.1:{http_a.port}/whoami HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(sock)[0] == 200  # the HEAD left the connection in step


def test_malformed_request_gets_400(zep):
    status, headers, _ = proxy_request(zep.http_port, b"GET http://127.0.0.1:1/ HTTP/1.1\r\nBad Header Line\r\n\r\n")
    assert status == 400
    assert headers["connection"] == "close"


def test_origin_form_request_to_the_proxy_gets_400(zep):
    assert proxy_request(zep.http_port, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 400


def test_too_large_head_gets_431(zep, http_a):
    huge = b"X-Filler: " + b"a" * 70_000 + b"\r\n"
    request = f"GET http://127.0.0.1:{http_a.port}/ HTTP/1.1\r\nHost: x\r\n".encode() + huge + b"\r\n"
    assert proxy_request(zep.http_port, request)[0] == 431


def test_refused_upstream_gets_502(zep):
    port = closed_port()
    status, _headers, body = proxy_request(zep.http_port, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 502
    assert b"refused" in body.lower()
    result = curl("-x", f"http://127.0.0.1:{zep.http_port}", "--write-out", "%{http_connect}", f"https://127.0.0.1:{port}/")
    assert result.stdout.endswith(b"502")


def test_dial_timeout_gets_504(relay_impl, driver):
    with start_zep("--direct", "--connect-timeout", "0.5", relay=relay_impl, driver=driver) as zp, blackhole_port() as port:
        status, _, _ = proxy_request(zp.http_port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 504
        status, _, _ = proxy_request(zp.http_port, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 504


def test_upstream_that_closes_without_answering_gets_502(zep):
    with socket.create_server(("127.0.0.1", 0)) as mute:
        port = mute.getsockname()[1]
        with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
            sock.sendall(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            conn, _ = mute.accept()
            conn.recv(65536)
            conn.close()
            status, _, body = read_response(sock)
            assert status == 502
            assert b"upstream closed" in body


def test_http_over_maxconn_gets_503(relay_impl, driver, echo):
    with start_zep("--direct", "--maxconn", "1", relay=relay_impl, driver=driver) as zp:
        with socket.create_connection(("127.0.0.1", zp.http_port), timeout=10) as first:
            first.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_exactly(first, 39).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", zp.http_port), timeout=10) as second:
                assert recv_until_eof(second).startswith(b"HTTP/1.1 503")


def test_expect_100_continue_is_forwarded_and_the_upstream_answers(zep, http_a):
    body = b"x" * 1000
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        sock.sendall(f"POST http://127.0.0.1:{http_a.port}/sha256 HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert recv_exactly(sock, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"  # the upstream's, before any body byte
        sock.sendall(body)
        status, _headers, answer = read_response(sock)
        assert status == 200 and json.loads(answer) == {"sha256": sha256(body), "length": len(body)}
    assert http_a.requests[-1][2]["Expect"] == "100-continue"


def test_expect_100_continue_gets_the_upstreams_final_answer_without_sending_the_body(zep, http_a):
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        sock.sendall(f"PUT http://127.0.0.1:{http_a.port}/early413 HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n".encode())
        status, headers, answer = read_response(sock)
        assert (status, answer, headers["connection"]) == (413, b"too large", "close")
        assert recv_until_eof(sock) == b""  # the body was never sent: the connection cannot go on


@pytest.mark.parametrize("expect", ["Expect:", "Expect: 100-continue"])
def test_early_answer_to_a_big_upload_reaches_curl(zep, http_a, tmp_path, expect):
    """An upstream that refuses an upload before reading it: curl gets its 413, as without a proxy."""
    upload = tmp_path / "upload"
    with open(upload, "wb") as out:
        out.truncate(100 * 1024 * 1024)
    result = curl("-x", f"http://127.0.0.1:{zep.http_port}", "-X", "POST", "-T", str(upload), "-H", expect,
                  "--write-out", "%{http_code}", "--output", "/dev/null", f"http://127.0.0.1:{http_a.port}/early413")
    assert result.stdout == b"413", result
    line = zep.wait_for_log(f"target=http://127.0.0.1:{http_a.port} path=/early413 status=413")
    assert "outcome=ok" in line


@pytest.mark.parametrize("request_line, headers", [
    ("GET http://127.0.0.1:{port}/whoami HTTP/1.1", ""),  # RFC 9112 3.2: HTTP/1.1 without Host
    ("GET http://127.0.0.1:{port}/whoami HTTP/1.1", "Host: two words\r\n"),  # an invalid Host
    ("GET http://127.0.0.1:{port}/whoami HTTP/1.1", "Host: a\r\nHost: b\r\n"),
    ("GET http://user:pw@127.0.0.1:{port}/whoami HTTP/1.1", "Host: x\r\n"),  # RFC 9110 4.2.4: userinfo
    ("GET  http://127.0.0.1:{port}/whoami HTTP/1.1", "Host: x\r\n"),  # RFC 9112 3: single spaces
    ("GET http://127.0.0.1:{port}/whoami  HTTP/1.1", "Host: x\r\n"),
])
def test_requests_a_server_must_refuse_get_400_and_go_nowhere(zep, http_a, request_line, headers):
    before = len(http_a.requests)
    request = (request_line.format(port=http_a.port) + "\r\n" + headers + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        mark = zep.client_mark(sock)
        sock.sendall(request)
        status, response_headers, _ = read_response(sock)
        assert (status, response_headers["connection"]) == (400, "close")
        line = zep.wait_for_client(mark)
    assert "outcome=bad-request" in line and "pw" not in line
    assert len(http_a.requests) == before


@pytest.mark.parametrize("user, logged", [("alice", "user=alice"), ("s3cret", "user=?")])
def test_failed_login_logs_only_a_configured_user_name(zep_auth, http_a, user, logged):
    result = curl("-x", f"http://{user}:nope@127.0.0.1:{zep_auth.http_port}", "--write-out", "%{http_code}",
                  "--output", "/dev/null", f"http://127.0.0.1:{http_a.port}/whoami?login-{user}")
    assert result.stdout == b"407"
    line = zep_auth.wait_for_log(f"path=/whoami status=407 route=- {logged} ")
    assert "s3cret" not in line and "nope" not in line and "login-" not in line  # nor the query string
    with socket.create_connection(("127.0.0.1", zep_auth.socks_port), timeout=10) as sock:
        mark = zep_auth.client_mark(sock)
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01" + bytes([len(user)]) + user.encode() + b"\x04nope")
        assert recv_until_eof(sock) == b"\x01\x01"
        line = zep_auth.wait_for_client(mark)
    assert f" {logged} " in line and "s3cret" not in line and "outcome=auth-failed" in line


def test_json_log_lines(relay_impl, driver, http_a, http_b):
    with start_zep("--direct", "--log-format", "json", relay=relay_impl, driver=driver) as zp:
        with socket.create_connection(("127.0.0.1", zp.http_port), timeout=10) as sock:
            for upstream, path in ((http_a, "/whoami?q=1"), (http_b, "/nothing"), (http_a, "/whoami")):
                sock.sendall(f"GET http://127.0.0.1:{upstream.port}{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                read_response(sock)
        zp.wait_for_lines('"outcome":', 3)  # one entry per request, the last written after its response
        lines = [json.loads(line) for line in zp.log_text().splitlines()]
    entries = [line for line in lines if "outcome" in line]
    assert [(e["target"], e["path"], e["status"], e["outcome"]) for e in entries] == [
        (f"http://127.0.0.1:{http_a.port}", "/whoami", 200, "ok"),
        (f"http://127.0.0.1:{http_b.port}", "/nothing", 404, "ok"),
        (f"http://127.0.0.1:{http_a.port}", "/whoami", 200, "ok"),
    ]
    assert all(e["method"] == "GET" and e["route"] == "direct" and e["up"] > 0 and e["down"] > 0 for e in entries)
    assert any(line.get("logger") == "zep" and "ready" in line["message"] for line in lines)


def test_an_idle_upstream_connection_the_server_closed_is_not_reused(zep):
    """Servers close idle kept-alive connections (Apache after 5 s): the next request on the client's
    connection must reach the server on a new one, as the client itself would do without a proxy."""
    listener = socket.create_server(("127.0.0.1", 0))
    first_closed = threading.Event()

    def server() -> None:
        for number in (1, 2):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % number)  # keep-alive...
            first_closed.set()  # ... and yet closed, as idle connections are

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    with listener, socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        sock.sendall(request)
        assert read_response(sock)[2] == b"1"
        assert first_closed.wait(10)
        sock.sendall(request)
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"2")
