"""The sans-IO exchanges in process: feed these events, expect these commands."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zep.auth import Credentials
from zep.dial import Failure
from zep.exchange import (
    CLIENT,
    HTTP_KEEP_ALIVE,
    HTTP_REQUEST,
    SERVER,
    Arm,
    Cancel,
    ClientData,
    ClientEof,
    ClientError,
    Close,
    CloseUpstream,
    Dial,
    DialFailed,
    Dialed,
    Disarm,
    Drain,
    Log,
    Report,
    SendClient,
    SendUpstream,
    TimerFired,
    Tunnel,
    UpstreamData,
    UpstreamEof,
    UpstreamError,
)
from zep.http_exchange import CONNECT_ESTABLISHED, RELAY_UNAVAILABLE, HttpExchange
from zep.outcome import Outcome
from zep.socks5 import connect_reply
from zep.socks_exchange import Socks5Exchange

CREDS = Credentials("alice", "s3cret")
GREETING = b"\x05\x01\x00"
REQUEST = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # CONNECT example.com:443


def logs(commands) -> list[Report]:
    return [c.report for c in commands if isinstance(c, Log)]


def sent(commands) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, SendClient))


def upstream_bytes(commands) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, SendUpstream))


# ----------------------------------------------------------------------------- SOCKS5


class TestSocks5:
    def test_handshake_dial_tunnel(self):
        ex = Socks5Exchange(None)
        assert ex.start() == [Arm(HTTP_REQUEST)]
        assert ex.handle(ClientData(GREETING)) == [SendClient(b"\x05\x00")]
        assert ex.handle(ClientData(REQUEST + b"early")) == [Disarm(HTTP_REQUEST), Dial("example.com", 443)]
        assert not ex.wants_client
        commands = ex.handle(Dialed("direct", ("10.0.0.1", 4000)))
        assert commands == [Tunnel(connect_reply(0, ("10.0.0.1", 4000)), connect_reply(0x01), b"early",
                                   Report(Outcome.OK, "example.com:443", "direct", "-"))]

    def test_timeout(self):
        ex = Socks5Exchange(None)
        ex.handle(ClientData(b"\x05"))
        commands = ex.handle(TimerFired(HTTP_REQUEST))
        assert logs(commands)[0].outcome is Outcome.REQUEST_TIMEOUT and commands[-1] == Close()

    def test_dial_failure_gets_its_reply_code(self):
        ex = Socks5Exchange(None)
        ex.handle(ClientData(GREETING + REQUEST))
        commands = ex.handle(DialFailed(Failure.NOT_ALLOWED, "deny policy"))
        assert sent(commands) == connect_reply(0x02)
        assert logs(commands) == [Report(Outcome.DENIED, "example.com:443", "deny", "-", "deny policy")]

    @pytest.mark.parametrize("user, logged", [(b"alice", "alice"), (b"s3cret", "?")])
    def test_failed_login_names_only_a_configured_user(self, user, logged):
        ex = Socks5Exchange(CREDS)
        ex.handle(ClientData(b"\x05\x01\x02"))
        commands = ex.handle(ClientData(b"\x01" + bytes([len(user)]) + user + b"\x05wrong"))
        (report,) = logs(commands)
        assert (report.outcome, report.user) == (Outcome.AUTH_FAILED, logged)
        assert "s3cret" not in report.detail and "wrong" not in report.detail

    def test_client_leaving_and_cancel(self):
        ex = Socks5Exchange(None)
        assert logs(ex.handle(ClientEof()))[0].outcome is Outcome.CLIENT_CLOSED
        ex = Socks5Exchange(None)
        assert logs(ex.handle(ClientError("ECONNRESET")))[0].outcome is Outcome.CLIENT_ERROR
        ex = Socks5Exchange(None)
        assert ex.handle(Drain()) == []
        assert logs(ex.handle(Cancel()))[0].outcome is Outcome.CANCELLED

    def test_not_socks(self):
        commands = Socks5Exchange(None).handle(ClientData(b"GET / HTTP/1.1\r\n"))
        assert logs(commands)[0].outcome is Outcome.BAD_REQUEST and commands[-1] == Close()


# ----------------------------------------------------------------------------- HTTP


def http(credentials=None) -> HttpExchange:
    ex = HttpExchange(credentials, 65536)
    assert ex.start() == [Arm(HTTP_REQUEST)]
    return ex


def get(path="/p?token=x", host="up", port=80, extra=b"") -> bytes:
    return b"GET http://%s:%d%s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (host.encode(), port, path.encode(), host.encode(), extra)


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class TestForwarding:
    def test_get_then_keep_alive(self):
        ex = http()
        assert ex.handle(ClientData(get())) == [Disarm(HTTP_REQUEST), Dial("up", 80, reuse=True)]
        commands = ex.handle(Dialed("direct", None))
        assert commands == [SendUpstream(b"GET /p?token=x HTTP/1.1\r\nHost: up:80\r\n\r\n"), Disarm(CLIENT), Arm(SERVER)]
        assert ex.wants_upstream and not ex.wants_client
        commands = ex.handle(UpstreamData(OK_RESPONSE))
        assert sent(commands) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi"
        assert logs(commands) == [Report(Outcome.OK, "http://up:80", "direct", "-", "", "GET", "/p", 200)]
        assert commands[-1] == Arm(HTTP_KEEP_ALIVE) and ex.wants_client and not ex.wants_upstream

    def test_the_upstream_is_kept_for_reuse_unless_it_cannot_carry_another_request(self):
        ex = http()
        ex.handle(ClientData(get()))
        ex.handle(Dialed("direct", None))
        assert CloseUpstream() not in ex.handle(UpstreamData(OK_RESPONSE))
        commands = ex.handle(ClientData(get("/again")))
        assert commands == [Disarm(HTTP_KEEP_ALIVE), Arm(HTTP_REQUEST), Disarm(HTTP_REQUEST), Dial("up", 80, reuse=True)]
        assert ex.handle(Dialed("direct", None))[0] == SendUpstream(b"GET /again HTTP/1.1\r\nHost: up:80\r\n\r\n")
        commands = ex.handle(UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
        assert CloseUpstream() in commands and logs(commands)[0].route == "direct"
        connect = ex.handle(ClientData(b"CONNECT up:80 HTTP/1.1\r\nHost: up:80\r\n\r\n"))
        assert connect[-1] == Dial("up", 80, reuse=False)  # a tunnel never rides an HTTP connection

    def test_three_requests_two_hosts_three_entries(self):
        ex = http()
        entries = []
        for host in ("a", "b", "a"):
            assert ex.handle(ClientData(get("/x", host=host)))[-1] == Dial(host, 80, reuse=True)
            ex.handle(Dialed("direct", None))
            entries += logs(ex.handle(UpstreamData(OK_RESPONSE)))
        assert [(e.target, e.status) for e in entries] == [("http://a:80", 200), ("http://b:80", 200), ("http://a:80", 200)]

    def test_body_streams_and_the_response_is_read_meanwhile(self):
        ex = http()
        ex.handle(ClientData(b"POST http://up/u HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\nhello"))
        commands = ex.handle(Dialed("direct", None))
        assert upstream_bytes(commands).endswith(b"\r\n\r\nhello") and commands[-1] == Arm(CLIENT)
        assert ex.wants_client and ex.wants_upstream
        commands = ex.handle(ClientData(b"world"))
        assert upstream_bytes(commands) == b"world" and commands[-2:] == [Disarm(CLIENT), Arm(SERVER)]
        assert logs(ex.handle(UpstreamData(OK_RESPONSE)))[0].outcome is Outcome.OK

    def test_early_response_stops_the_body_and_closes(self):
        ex = http()
        ex.handle(ClientData(b"POST http://up/early HTTP/1.1\r\nHost: up\r\nContent-Length: 1000\r\n\r\nabc"))
        ex.handle(Dialed("direct", None))
        commands = ex.handle(UpstreamData(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n"))
        assert sent(commands).startswith(b"HTTP/1.1 413 Too Large\r\n") and b"Connection: close" in sent(commands)
        assert CloseUpstream() in commands and commands[-1] == Close(linger=True)
        assert logs(commands)[0].status == 413 and logs(commands)[0].outcome is Outcome.OK

    def test_early_response_after_a_failed_send_is_still_passed_on(self):
        ex = http()
        ex.handle(ClientData(b"PUT http://up/ HTTP/1.1\r\nHost: up\r\nContent-Length: 1000\r\n\r\n"))
        ex.handle(Dialed("direct", None))
        assert ex.handle(UpstreamError("EPIPE", sending=True)) == [Disarm(CLIENT), Arm(SERVER)]
        assert not ex.wants_client and ex.wants_upstream
        commands = ex.handle(UpstreamData(b"HTTP/1.1 413 No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
        assert logs(commands)[0].status == 413

    def test_failed_send_and_no_answer_is_502(self):
        ex = http()
        ex.handle(ClientData(b"PUT http://up/ HTTP/1.1\r\nHost: up\r\nContent-Length: 1000\r\n\r\n"))
        ex.handle(Dialed("direct", None))
        ex.handle(UpstreamError("EPIPE", sending=True))
        commands = ex.handle(UpstreamEof())
        assert sent(commands).startswith(b"HTTP/1.1 502 ") and b"EPIPE" in sent(commands)
        assert logs(commands)[0].outcome is Outcome.RESPONSE_FAILED

    def test_expect_100_continue_is_forwarded_and_the_interim_answer_passed_back(self):
        ex = http()
        ex.handle(ClientData(b"PUT http://up/ HTTP/1.1\r\nHost: up\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"))
        assert b"Expect: 100-continue" in upstream_bytes(ex.handle(Dialed("direct", None)))
        assert sent(ex.handle(UpstreamData(b"HTTP/1.1 100 Continue\r\n\r\n"))) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert upstream_bytes(ex.handle(ClientData(b"ok"))) == b"ok"

    @pytest.mark.parametrize("timer, before, status, outcome", [
        (CLIENT, b"", 408, Outcome.CLIENT_TIMEOUT),  # the client stopped sending its body
        (SERVER, b"!", 504, Outcome.RESPONSE_TIMEOUT),  # body complete, no response
    ])
    def test_timeouts_while_forwarding(self, timer, before, status, outcome):
        ex = http()
        ex.handle(ClientData(b"POST http://up/ HTTP/1.1\r\nHost: up\r\nContent-Length: 1\r\n\r\n" + before))
        ex.handle(Dialed("direct", None))
        commands = ex.handle(TimerFired(timer))
        assert sent(commands).startswith(b"HTTP/1.1 %d " % status)
        assert logs(commands)[0].outcome is outcome and CloseUpstream() in commands

    def test_server_timeout_mid_response_resets_the_client(self):
        ex = http()
        ex.handle(ClientData(get()))
        ex.handle(Dialed("direct", None))
        ex.handle(UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
        commands = ex.handle(TimerFired(SERVER))
        assert logs(commands)[0].outcome is Outcome.SERVER_TIMEOUT and commands[-1] == Close(abort=True)

    def test_request_timeouts(self):
        ex = http()
        commands = ex.handle(TimerFired(HTTP_REQUEST))
        assert sent(commands) == b"" and logs(commands)[0].outcome is Outcome.REQUEST_TIMEOUT
        ex = http()
        ex.handle(ClientData(b"GET http://up/ HTTP/1.1\r\nHo"))
        commands = ex.handle(TimerFired(HTTP_REQUEST))
        assert sent(commands).startswith(b"HTTP/1.1 408 ") and logs(commands)[0].outcome is Outcome.REQUEST_TIMEOUT

    def test_keep_alive_timeout_and_eof_between_requests_log_nothing(self):
        for ending in (TimerFired(HTTP_KEEP_ALIVE), ClientEof(), ClientError("ECONNRESET")):
            ex = http()
            ex.handle(ClientData(get()))
            ex.handle(Dialed("direct", None))
            ex.handle(UpstreamData(OK_RESPONSE))
            assert ex.handle(ending) == [Close()]

    def test_connection_without_a_request_gets_one_entry(self):
        assert logs(http().handle(ClientEof()))[0].outcome is Outcome.CLIENT_CLOSED

    @pytest.mark.parametrize("request_bytes", [
        b"GET http://up/ HTTP/1.1\r\n\r\n",  # no Host
        b"GET http://up/ HTTP/1.1\r\nHost: a b\r\n\r\n",  # invalid Host
        b"GET http://user:pw@up/ HTTP/1.1\r\nHost: up\r\n\r\n",  # userinfo
        b"GET  http://up/ HTTP/1.1\r\nHost: up\r\n\r\n",  # doubled space
        b"GET http://up/  HTTP/1.1\r\nHost: up\r\n\r\n",
    ])
    def test_requests_refused_with_400(self, request_bytes):
        commands = http().handle(ClientData(request_bytes))
        assert sent(commands).startswith(b"HTTP/1.1 400 ")
        assert logs(commands)[0].outcome is Outcome.BAD_REQUEST and not any(isinstance(c, Dial) for c in commands)
        assert "pw" not in logs(commands)[0].detail

    @pytest.mark.parametrize("authorization, user", [(None, "-"), (b"Basic YWxpY2U6bm8=", "alice"),
                                                     (b"Basic czNjcmV0Om5v", "?")])
    def test_407_and_who_is_logged(self, authorization, user):
        extra = b"Proxy-Authorization: %s\r\n" % authorization if authorization else b""
        commands = http(CREDS).handle(ClientData(get(extra=extra)))
        (report,) = logs(commands)
        assert (report.status, report.outcome, report.user) == (407, Outcome.AUTH_FAILED, user)
        assert "s3cret" not in report.detail

    def test_drain_closes_between_requests_and_says_close_on_the_next_response(self):
        ex = http()
        ex.handle(ClientData(get()))
        ex.handle(Dialed("direct", None))
        ex.handle(UpstreamData(OK_RESPONSE))
        assert ex.handle(Drain()) == [Close()]
        ex = http()
        ex.handle(ClientData(get()))
        ex.handle(Dialed("direct", None))
        assert ex.handle(Drain()) == []
        commands = ex.handle(UpstreamData(OK_RESPONSE))
        assert b"Connection: close" in sent(commands) and commands[-1] == Close()

    def test_cancel_logs_the_request_in_hand(self):
        ex = http()
        ex.handle(ClientData(get()))
        ex.handle(Dialed("direct", None))
        (report,) = logs(ex.handle(Cancel()))
        assert (report.outcome, report.target) == (Outcome.CANCELLED, "http://up:80")

    def test_ziti_upstream_closing_before_a_byte_is_the_overlay_dial(self):
        ex = http()
        ex.handle(ClientData(get()))
        ex.handle(Dialed("ziti:intercept", None))
        assert logs(ex.handle(UpstreamEof()))[0].outcome is Outcome.ZITI_DIAL_FAILED


class TestConnect:
    def test_connect_tunnel_with_early_bytes(self):
        ex = http()
        assert ex.handle(ClientData(b"CONNECT up:443 HTTP/1.1\r\nHost: up:443\r\n\r\n\x16\x03")) == [
            Disarm(HTTP_REQUEST), Dial("up", 443, reuse=False)]
        commands = ex.handle(Dialed("direct", None))
        assert commands == [Tunnel(CONNECT_ESTABLISHED, RELAY_UNAVAILABLE, b"\x16\x03",
                                   Report(Outcome.OK, "up:443", "direct", "-", method="CONNECT"))]
        assert RELAY_UNAVAILABLE.startswith(b"HTTP/1.1 503 ")

    def test_connect_dial_failure(self):
        ex = http()
        ex.handle(ClientData(b"CONNECT up:443 HTTP/1.1\r\nHost: up:443\r\n\r\n"))
        commands = ex.handle(DialFailed(Failure.TIMEOUT, "connect timed out"))
        assert sent(commands).startswith(b"HTTP/1.1 504 ") and logs(commands)[0].outcome is Outcome.DIAL_TIMEOUT


# ----------------------------------------------------------------------------- any input


SAMPLES = [GREETING + REQUEST, b"\x05\x01\x02\x01\x05alice\x06s3cret" + REQUEST, get(),
           b"POST http://up/ HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=",
           b"CONNECT up:1 HTTP/1.1\r\nHost: up:1\r\n\r\n", OK_RESPONSE]


class ScriptedDriver:
    """Carries out commands the way the driver does, without sockets: tracks armed timers,
    answers a Dial, and delivers only what the exchange waits for."""

    def __init__(self, exchange, dial_ok: bool) -> None:
        self.exchange = exchange
        self.dial_ok = dial_ok
        self.armed: list[str] = []
        self.reports: list[Report] = []
        self.ended = None
        self.apply(exchange.start())

    def apply(self, commands) -> None:
        for command in commands:
            assert self.ended is None, f"{command} after {self.ended}"
            if isinstance(command, Arm):
                self.armed = [n for n in self.armed if n != command.name] + [command.name]
            elif isinstance(command, Disarm):
                self.armed = [n for n in self.armed if n != command.name]
            elif isinstance(command, Log):
                assert command.report.outcome in set(Outcome)
                self.reports.append(command.report)
            elif isinstance(command, (Close, Tunnel)):
                self.ended = command
            elif isinstance(command, Dial):
                result = Dialed("direct", ("127.0.0.1", 9)) if self.dial_ok else DialFailed(Failure.REFUSED, "no")
                self.apply(self.exchange.handle(result))
                return

    def feed(self, event) -> None:
        if self.ended is None:
            self.apply(self.exchange.handle(event))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["socks", "socks-auth", "http", "http-auth"]), st.sampled_from(SAMPLES + [b""]),
       st.lists(st.binary(max_size=60), max_size=6), st.lists(st.binary(max_size=60), max_size=4),
       st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_random_bytes_never_raise_and_every_connection_ends_with_an_outcome(
        kind, sample, client_chunks, upstream_chunks, dial_ok, client_eof, upstream_eof, drain):
    credentials = CREDS if kind.endswith("auth") else None
    exchange = Socks5Exchange(credentials) if kind.startswith("socks") else HttpExchange(credentials, 1024)
    driver = ScriptedDriver(exchange, dial_ok)
    for chunk in [sample, *client_chunks]:
        if exchange.wants_client:
            driver.feed(ClientData(chunk))
        for data in upstream_chunks:
            if exchange.wants_upstream:
                driver.feed(UpstreamData(data))
    if drain:
        driver.feed(Drain())
    if upstream_eof and exchange.wants_upstream:
        driver.feed(UpstreamEof())
    if client_eof and exchange.wants_client:
        driver.feed(ClientEof())
    for _ in range(4):  # whatever state it is in, its armed timers bring it to an end
        if driver.ended is not None:
            break
        assert driver.armed, f"{kind} waits with no timer armed"
        driver.feed(TimerFired(driver.armed[-1]))
    assert isinstance(driver.ended, (Close, Tunnel))
    assert driver.reports or isinstance(driver.ended, Tunnel), "a connection must leave an access entry"
