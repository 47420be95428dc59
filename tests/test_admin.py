"""The admin listener: its request reader in-process, then /healthz, /readyz and /metrics on a real zep
with real clients, metrics parsed with prometheus_client's own parser and moved by real traffic."""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings as hypothesis_settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import curl, recv_exactly, recv_until_eof
from tests.support.upstreams import Upstream
from tests.support.zepproc import ZepProcess, run_zep, start_zep
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)
from zep.admin import Admin, Malformed, Request, RequestReader
from zep.metrics import Metrics


def read_all(data: bytes, max_head_bytes: int = 8192) -> Request | Malformed | None:
    reader = RequestReader(max_head_bytes)
    return reader.feed(data)


# ----------------------------------------------------------------------------- the request reader


@pytest.mark.parametrize("data, expected", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Request("GET", "/healthz")),
    (b"HEAD /readyz HTTP/1.0\r\n\r\n", Request("HEAD", "/readyz")),
    (b"GET /metrics?name[]=zep_bytes_total HTTP/1.1\r\n\r\n", Request("GET", "/metrics")),
    (b"GET http://10.0.0.1:9090/healthz HTTP/1.1\r\n\r\n", Request("GET", "/healthz")),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", Request("POST", "/healthz")),
    (b"GET /healthz HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", Request("GET", "/healthz")),
])
def test_reads_a_request_head(data: bytes, expected: Request) -> None:
    assert read_all(data) == expected


def test_a_head_in_pieces_needs_more_until_complete() -> None:
    reader = RequestReader()
    data = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert [reader.feed(data[i:i + 1]) for i in range(len(data) - 1)] == [None] * (len(data) - 1)
    assert reader.feed(data[-1:]) == Request("GET", "/readyz")


@pytest.mark.parametrize("data, status", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
    (b"GET /healthz HTTP/9.9\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"v" * 9000, 431),
])
def test_bad_heads(data: bytes, status: int) -> None:
    result = read_all(data)
    assert isinstance(result, Malformed) and result.status == status


def test_eof_before_a_head_is_a_bad_request() -> None:
    reader = RequestReader()
    assert reader.feed(b"GET /hea") is None
    assert reader.feed_eof().status == 400


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=20))
def test_any_bytes_give_a_request_a_refusal_or_a_wait(chunks: list[bytes]) -> None:
    reader = RequestReader(max_head_bytes=1024)
    for chunk in chunks:
        result = reader.feed(chunk)
        assert result is None or isinstance(result, (Request, Malformed))
        if result is not None:
            if isinstance(result, Malformed):
                assert result.status in (400, 431)
            return


# ----------------------------------------------------------------------------- the answers


class State:
    why_not: str | None = "loading Ziti identities"


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def admin(state: State) -> Admin:
    return Admin(Metrics(version="9.9", relay="python", relay_stats=None), lambda: state.why_not)


def test_answers_by_path_and_method(admin: Admin) -> None:
    assert admin.answer(Request("GET", "/healthz")).status == 200
    assert admin.answer(Request("GET", "/nope")).status == 404
    refused = admin.answer(Request("DELETE", "/healthz"))
    assert refused.status == 405 and ("Allow", "GET, HEAD") in refused.headers
    assert admin.answer(Malformed(431, "too big")).status == 431


def test_readiness_follows_the_state(admin: Admin, state: State) -> None:
    starting = admin.answer(Request("GET", "/readyz"))
    assert (starting.status, starting.body) == (503, b"not ready: loading Ziti identities\n")
    state.why_not = None
    assert admin.answer(Request("GET", "/readyz")).status == 200
    state.why_not = "draining"
    assert admin.answer(Request("HEAD", "/readyz")).body == b"not ready: draining\n"


def test_head_answers_carry_no_body(admin: Admin) -> None:
    response = admin.answer(Request("HEAD", "/healthz"))
    encoded = response.encode(head_only=True)
    assert encoded.endswith(b"\r\n\r\n") and b"Content-Length: 3\r\n" in encoded


# ----------------------------------------------------------------------------- a real zep


def admin_url(zp: ZepProcess, path: str) -> str:
    return f"http://127.0.0.1:{zp.admin_port}{path}"


def scrape(zp: ZepProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value, through prometheus_client's parser."""
    response = requests.get(admin_url(zp, "/metrics"), timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grown(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for_access_lines(zp: ZepProcess, count: int, timeout: float = 10.0) -> None:
    """Until `count` exchanges have ended (each is counted before its line is written)."""
    deadline = time.monotonic() + timeout
    while len(zp.access_lines()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} access lines within {timeout} s:\n{zp.log_text()}"
        time.sleep(0.02)


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return recv_until_eof(sock)


@pytest.fixture(scope="module")
def zep_admin(relay_impl: str) -> Iterator[ZepProcess]:
    with start_zep("--direct", "--admin", "127.0.0.1:0", "--handshake-timeout", "1", relay=relay_impl) as zp:
        yield zp


def test_probes_answer_when_ready(zep_admin: ZepProcess) -> None:
    health = requests.get(admin_url(zep_admin, "/healthz"), timeout=10)
    assert (health.status_code, health.text, health.headers["Connection"]) == (200, "ok\n", "close")
    ready = requests.get(admin_url(zep_admin, "/readyz"), timeout=10)
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert requests.head(admin_url(zep_admin, "/readyz"), timeout=10).status_code == 200


def test_bad_requests_get_http_errors(zep_admin: ZepProcess) -> None:
    assert requests.get(admin_url(zep_admin, "/"), timeout=10).status_code == 404
    post = requests.post(admin_url(zep_admin, "/metrics"), data=b"x", timeout=10)
    assert (post.status_code, post.headers["Allow"]) == (405, "GET, HEAD")
    assert raw_exchange(zep_admin.admin_port, b"\x16\x03\x01\x00\x05hello").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /healthz HTTP/1.1\r\nX: " + b"v" * 20000 + b"\r\n\r\n"
    assert raw_exchange(zep_admin.admin_port, huge).startswith(b"HTTP/1.1 431 ")


def test_a_client_that_sends_nothing_gets_408(zep_admin: ZepProcess) -> None:
    with socket.create_connection(("127.0.0.1", zep_admin.admin_port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 408 ")  # after the 1 s request timeout


def test_probes_are_not_logged_as_access_or_errors(zep_admin: ZepProcess) -> None:
    before = len(zep_admin.access_lines())
    for path in ("/healthz", "/readyz", "/metrics", "/nope"):
        requests.get(admin_url(zep_admin, path), timeout=10)
    assert len(zep_admin.access_lines()) == before
    assert not [line for line in zep_admin.log_text().splitlines() if " WARNING " in line or " ERROR " in line]


def test_build_info_and_limits(zep_admin: ZepProcess, relay_impl: str) -> None:
    samples = scrape(zep_admin)
    import zep
    assert value(samples, "zep_build_info", version=zep.__version__, relay=relay_impl, sdk="none") == 1
    assert value(samples, "zep_max_connections") > 1000
    assert value(samples, "zep_ziti_identities_loaded") == 0


def test_a_socks5_tunnel_moves_its_series(zep_admin: ZepProcess, http_a: Upstream) -> None:
    before, lines = scrape(zep_admin), len(zep_admin.access_lines())
    result = curl("-x", f"socks5h://127.0.0.1:{zep_admin.socks_port}", f"http://{http_a.authority}/bytes/5000")
    assert result.returncode == 0 and len(result.stdout) == 5000
    wait_for_access_lines(zep_admin, lines + 1)
    after = scrape(zep_admin)
    assert grown(before, after, "zep_exchanges_total", proto="socks5", route_kind="direct", outcome="ok") == 1
    assert grown(before, after, "zep_connections_accepted_total", proto="socks5") == 1
    assert grown(before, after, "zep_bytes_total", direction="down", route_kind="direct") > 5000  # body and head
    assert grown(before, after, "zep_bytes_total", direction="up", route_kind="direct") > 0
    assert grown(before, after, "zep_dial_seconds_count", route_kind="direct") == 1
    assert value(after, "zep_dial_seconds_bucket", route_kind="direct", le="+Inf") == \
        value(after, "zep_dial_seconds_count", route_kind="direct")


def test_an_http_forward_and_a_connect_move_their_series(zep_admin: ZepProcess, http_a: Upstream) -> None:
    before, lines = scrape(zep_admin), len(zep_admin.access_lines())
    proxy = f"http://127.0.0.1:{zep_admin.http_port}"
    assert curl("-x", proxy, f"http://{http_a.authority}/whoami").returncode == 0
    assert curl("-x", proxy, "--proxytunnel", f"http://{http_a.authority}/whoami").returncode == 0
    wait_for_access_lines(zep_admin, lines + 2)
    after = scrape(zep_admin)
    assert grown(before, after, "zep_exchanges_total", proto="http", route_kind="direct", outcome="ok") == 2
    assert grown(before, after, "zep_connections_accepted_total", proto="http") == 2
    assert grown(before, after, "zep_dial_seconds_count", route_kind="direct") == 2
    assert grown(before, after, "zep_bytes_total", direction="down", route_kind="direct") > 0


def test_handshake_failures_count_by_reason(zep_admin: ZepProcess) -> None:
    before, lines = scrape(zep_admin), len(zep_admin.access_lines())
    assert raw_exchange(zep_admin.http_port, b"GET /not-a-proxy-request HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    raw_exchange(zep_admin.socks_port, b"\x04\x01")  # SOCKS4: closed
    wait_for_access_lines(zep_admin, lines + 2)
    after = scrape(zep_admin)
    for proto in ("http", "socks5"):
        assert grown(before, after, "zep_handshake_failures_total", proto=proto, reason="bad-request") == 1


def test_active_gauges_follow_an_open_tunnel(zep_admin: ZepProcess, echo) -> None:
    from tests.support.clients import socks_session
    with socks_session(zep_admin.socks_port, "127.0.0.1", echo.port) as (sock, reply):
        assert reply == 0
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        samples = scrape(zep_admin)
        assert value(samples, "zep_tunnels_active") >= 1
        assert value(samples, "zep_connections_active") >= 1


def test_relay_engine_figures(zep_admin: ZepProcess, relay_impl: str) -> None:
    samples = scrape(zep_admin)
    names = {name for name, _ in samples}
    if relay_impl == "python":
        assert not [n for n in names if n.startswith("zep_relay_")]  # it keeps no figures
        return
    assert value(samples, "zep_relay_pairs_total") >= 1  # the earlier tunnels
    for name in ("zep_relay_pairs_running", "zep_relay_pipes_in_use", "zep_relay_pipes_pooled",
                 "zep_relay_pipes_created_total", "zep_relay_splice_bytes_total", "zep_relay_copy_bytes_total",
                 "zep_relay_splice_fallbacks_total"):
        assert name in names, name
    assert ("zep_relay_mode_switches_total", (("to", "copy"),)) in samples


def test_the_engines_socks5_handshakes_are_counted(zep_admin: ZepProcess, relay_impl: str, http_a: Upstream) -> None:
    """An IP literal: the engine's tunnel; a name: given back to Python. Both handshakes count
    (with the Python relay there is no engine, and no such series)."""
    names = ("zep_relay_socks_handshakes_total", "zep_relay_socks_tunnels_total", "zep_relay_socks_given_back_total")
    before, lines = scrape(zep_admin), len(zep_admin.access_lines())
    if relay_impl == "python":
        assert not [name for name, _ in before if name in names]
        return
    for proxy in ("socks5", "socks5h"):
        result = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"{proxy}://127.0.0.1:{zep_admin.socks_port}",
                      f"http://localhost:{http_a.port}/whoami")
        assert result.stdout == b"200", result.stderr
    wait_for_access_lines(zep_admin, lines + 2)
    after = scrape(zep_admin)
    assert [grown(before, after, name) for name in names] == [2, 1, 1]


def test_no_label_names_a_destination_or_a_user(zep_admin: ZepProcess, http_a: Upstream) -> None:
    curl("-x", f"socks5h://127.0.0.1:{zep_admin.socks_port}", "http://localhost.invalid/")
    zep_admin.wait_for_log("target=localhost.invalid:80 ")
    text = requests.get(admin_url(zep_admin, "/metrics"), timeout=10).text
    assert "localhost.invalid" not in text and str(http_a.port) not in text


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("address, message", [
    ("9090", "ZEP_ADMIN_ADDRESS must be HOST:PORT"),
    ("127.0.0.1:99999", "no port from 0 to 65535"),
    ("::1:9090", "put an IPv6 address in brackets"),
])
def test_bad_admin_address_is_a_config_error(address: str, message: str) -> None:
    result = run_zep("serve", "--direct", env={"ZEP_ADMIN_ADDRESS": address})
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_admin_address_in_use_is_a_start_up_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_zep("serve", "--direct", "--socks-port", "0", "--http-port", "0", "--admin", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"cannot listen on admin address 127.0.0.1:{port}: Address already in use" in result.stderr


def test_ipv6_admin_address_and_the_ready_file() -> None:
    with start_zep("--direct", "--admin", "[::1]:0") as zp:
        line = zp.wait_for_log("listening: admin on [::1]:")
        port = int(line.rsplit(":", 1)[1].split()[0])
        connection = http.client.HTTPConnection("::1", port, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        assert zp.admin_port == port


def test_without_admin_nothing_listens_and_the_ready_file_has_no_admin() -> None:
    with start_zep("--direct") as zp:
        assert zp.admin_port is None
        assert "admin" not in zp.log_text()


# ----------------------------------------------------------------------------- with Ziti identities


def status_of(port: int, path: str) -> tuple[int, str]:
    response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    return response.status_code, response.text


def test_not_ready_while_identities_load_then_ziti_series(tmp_path: Path, openziti_path: Path,
                                                          http_a: Upstream) -> None:
    identity = write_identity(tmp_path / "team.json", [
        service("web", ["web.example.test"], ["80"], f"127.0.0.1:{http_a.port}"),
    ], load_delay_ms=1500)
    with start_zep("--identity", str(identity), "--fallback", "deny", "--admin", "127.0.0.1:0",
                   extra_pythonpath=[str(openziti_path)], wait_ready=False) as zp:
        line = zp.wait_for_log("listening: admin on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1].split()[0])
        assert status_of(port, "/healthz") == (200, "ok\n")  # the loop answers while the SDK loads
        assert status_of(port, "/readyz") == (503, "not ready: loading Ziti identities\n")
        assert "ziti identity loaded" not in zp.log_text()  # still loading when readiness said so
        zp.wait_ready()
        assert zp.admin_port == port
        assert status_of(port, "/readyz") == (200, "ready\n")

        socks = f"socks5h://127.0.0.1:{zp.socks_port}"
        assert curl("-x", socks, "http://web.example.test/whoami").returncode == 0
        assert curl("-x", socks, "http://web.ziti/whoami").returncode == 0
        denied = curl("-x", f"http://127.0.0.1:{zp.http_port}", f"http://{http_a.authority}/whoami",
                      "-o", "/dev/null", "-w", "%{http_code}")
        assert denied.stdout == b"403"
        wait_for_access_lines(zp, 3)
        samples = scrape(zp)
        assert value(samples, "zep_ziti_identities_loaded") == 1
        (build,) = [dict(labels) for (name, labels) in samples if name == "zep_build_info"]
        assert build["sdk"] == "1.18.3"  # what the stand-in's ziti_get_version says
        assert value(samples, "zep_exchanges_total", proto="socks5", route_kind="ziti", outcome="ok") == 2
        assert value(samples, "zep_ziti_exchanges_total", service="intercept", outcome="ok") == 1
        assert value(samples, "zep_ziti_exchanges_total", service="web", outcome="ok") == 1
        assert value(samples, "zep_exchanges_total", proto="http", route_kind="deny", outcome="denied") == 1
        assert value(samples, "zep_dial_seconds_count", route_kind="ziti") == 2


# ----------------------------------------------------------------------------- draining


def test_not_ready_while_draining_and_alive_until_the_last_tunnel_ends(echo) -> None:
    from tests.support.clients import socks_session
    with start_zep("--direct", "--admin", "127.0.0.1:0", "--drain-timeout", "20") as zp:
        with socks_session(zp.socks_port, "127.0.0.1", echo.port) as (sock, reply):
            assert reply == 0
            assert status_of(zp.admin_port, "/readyz") == (200, "ready\n")
            zp.proc.send_signal(signal.SIGTERM)  # the first one drains: the tunnel may go on
            zp.wait_for_log("draining: no new connections; 1 open ones")
            assert status_of(zp.admin_port, "/readyz") == (503, "not ready: draining\n")
            assert status_of(zp.admin_port, "/healthz") == (200, "ok\n")
            assert value(scrape(zp), "zep_tunnels_active") == 1
            sock.sendall(b"still here")
            assert recv_exactly(sock, 10) == b"still here"
        assert zp.proc.wait(10) == 0
    assert "outcome=ok" in zp.access_lines()[-1]
