"""The HTTP proxy through a real `zep serve`: forwarding, CONNECT, auth and every error status."""

from __future__ import annotations

import json
import socket
import ssl

import httpx
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
    line = zep.wait_for_log(f"proto=http target=127.0.0.1:{http_a.port}")
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
    assert "outcome=auth-failed" in line and f"target=127.0.0.1:{http_a.port}" in line


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


def test_dial_timeout_gets_504(relay_impl):
    with start_zep("--direct", "--connect-timeout", "0.5", relay=relay_impl) as zp, blackhole_port() as port:
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


def test_http_over_maxconn_gets_503(relay_impl, echo):
    with start_zep("--direct", "--maxconn", "1", relay=relay_impl) as zp:
        with socket.create_connection(("127.0.0.1", zp.http_port), timeout=10) as first:
            first.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_exactly(first, 39).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", zp.http_port), timeout=10) as second:
                assert recv_until_eof(second).startswith(b"HTTP/1.1 503")


def test_expect_100_continue_is_answered_by_the_proxy(zep, http_a):
    body = b"x" * 1000
    with socket.create_connection(("127.0.0.1", zep.http_port), timeout=10) as sock:
        sock.sendall(f"POST http://127.0.0.1:{http_a.port}/sha256 HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert recv_exactly(sock, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body byte was sent
        sock.sendall(body)
        status, _headers, answer = read_response(sock)
        assert status == 200 and json.loads(answer) == {"sha256": sha256(body), "length": len(body)}
    assert "Expect" not in http_a.requests[-1][2]
