"""Failed logins: the throttle and the digest in-process (a hand-moved clock), then end to end."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import curl, recv_exactly
from tests.support.upstreams import Upstream
from tests.support.zepproc import ZepProcess, start_zep
from zep import accesslog
from zep.accesslog import AccessEntry
from zep.auth import Credentials
from zep.exchange import ClientData, Dial, Login, SendClient
from zep.http_exchange import HttpExchange
from zep.outcome import Outcome
from zep.socks_exchange import Socks5Exchange
from zep.throttle import FailedLoginDigest, LoginThrottle, source_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fail(throttle: LoginThrottle, source: str, times: int) -> list[float]:
    """The delay each of `times` failed logins from `source` is answered with."""
    delays = []
    for _ in range(times):
        delays.append(throttle.delay(source))
        throttle.record(source, accepted=False)
    return delays


# ----------------------------------------------------------------------------- the throttle


def test_first_failures_are_free_then_the_delay_doubles_to_the_cap(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    assert fail(throttle, "10.0.0.1", 12) == [0, 0, 0, 0, 0, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_other_sources_are_answered_at_once(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "10.0.0.1", 20)
    assert throttle.delay("10.0.0.2") == 0
    assert throttle.delay("[::1]") == 0
    assert throttle.delay("10.0.0.1") == 2.0


def test_the_right_password_waits_too_then_resets_the_source(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "10.0.0.1", 8)
    assert throttle.delay("10.0.0.1") == 0.8  # a guesser cannot tell a right answer by its speed
    throttle.record("10.0.0.1", accepted=True)
    assert throttle.delay("10.0.0.1") == 0
    assert fail(throttle, "10.0.0.1", 6) == [0, 0, 0, 0, 0, 0.1]


def test_a_quiet_source_is_forgiven(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock, forgive_after=300)
    fail(throttle, "10.0.0.1", 10)
    clock.now += 299
    assert throttle.delay("10.0.0.1") == 2.0
    clock.now += 300
    assert throttle.delay("10.0.0.1") == 0
    assert len(throttle) == 0


def test_memory_is_bounded_least_recent_source_forgotten_first(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock, max_sources=100)
    fail(throttle, "victim-of-a-flood", 10)
    for n in range(1000):
        fail(throttle, f"10.1.{n // 256}.{n % 256}", 1)
    assert len(throttle) == 100
    assert throttle.delay("victim-of-a-flood") == 0
    fail(throttle, "10.9.9.9", 10)
    for n in range(99):  # the repeat offender stays while it keeps failing
        fail(throttle, f"10.2.0.{n}", 1)
    assert throttle.delay("10.9.9.9") == 2.0


@pytest.mark.parametrize("client, source", [("127.0.0.1:5555", "127.0.0.1"), ("[::1]:5555", "[::1]")])
def test_source_is_the_address_without_the_port(client: str, source: str) -> None:
    assert source_of(client) == source


# ----------------------------------------------------------------------------- the exchanges ask for it


ALICE = Credentials("alice", "s3cret")


def socks_login_commands(password: bytes) -> list:
    exchange = Socks5Exchange(ALICE)
    exchange.start()
    return exchange.handle(ClientData(b"\x05\x01\x02\x01\x05alice" + bytes([len(password)]) + password))


@pytest.mark.parametrize("password, accepted, answer", [(b"s3cret", True, b"\x01\x00"), (b"nope", False, b"\x01\x01")])
def test_socks5_exchange_puts_a_login_right_before_its_answer(password: bytes, accepted: bool, answer: bytes) -> None:
    commands = socks_login_commands(password)
    at = commands.index(Login(accepted))
    assert commands[:at] == [SendClient(b"\x05\x02")] and commands[at + 1] == SendClient(answer)


def http_login_commands(authorization: str | None) -> list:
    exchange = HttpExchange(ALICE, 65536)
    exchange.start()
    header = f"Proxy-Authorization: {authorization}\r\n" if authorization else ""
    return exchange.handle(ClientData(f"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n{header}\r\n".encode()))


@pytest.mark.parametrize("authorization, logins", [
    ("Basic " + base64.b64encode(b"alice:s3cret").decode(), [Login(True)]),
    ("Basic " + base64.b64encode(b"alice:nope").decode(), [Login(False)]),
    (None, []),  # no credentials: a challenge, not a guess
])
def test_http_exchange_puts_a_login_before_the_dial_or_the_407(authorization: str | None, logins: list) -> None:
    commands = http_login_commands(authorization)
    assert [c for c in commands if isinstance(c, Login)] == logins
    if logins:
        following = commands[commands.index(logins[0]) + 1:]
        assert isinstance(following[0], (Dial, SendClient))


# ----------------------------------------------------------------------------- the digest


def auth_failed(client: str, n: int = 0) -> AccessEntry:
    return AccessEntry(client=client, proto="socks5", target="-", route="-", user="?", up=0, down=0,
                       seconds=0.0, outcome=Outcome.AUTH_FAILED, detail=f"authentication failed (attempt {n})")


def held_after(free: int) -> tuple[LoginThrottle, FailedLoginDigest, Clock]:
    clock = Clock()
    throttle = LoginThrottle(free_failures=free, clock=clock)
    return throttle, FailedLoginDigest(throttle.holds, interval=10, clock=clock), clock


def failed_login(throttle: LoginThrottle, digest: FailedLoginDigest, client: str, n: int = 0) -> bool:
    """One wrong password from `client`, as the driver and the access log see it: folded or not."""
    throttle.record(source_of(client), accepted=False)
    return digest.fold(auth_failed(client, n))


def test_lines_until_the_throttle_holds_the_source_then_one_line_per_interval() -> None:
    throttle, digest, clock = held_after(3)
    assert [failed_login(throttle, digest, f"10.0.0.1:{1000 + n}", n) for n in range(3)] == [False] * 3
    assert all(failed_login(throttle, digest, f"10.0.0.1:{1000 + n}", n) for n in range(3, 52))
    assert failed_login(throttle, digest, "10.0.0.2:1000") is False  # another source: its own lines
    clock.now += 9.9
    assert digest.due() == []
    clock.now += 0.1
    (aggregate,) = digest.due()
    assert (aggregate.outcome, aggregate.count, aggregate.client) == (Outcome.AUTH_FAILED, 49, "10.0.0.1:1051")
    assert aggregate.detail.startswith("49 failed logins from 10.0.0.1 within 10 s, each answered late; the last: ")
    fields = accesslog.format_logfmt(aggregate)
    assert " outcome=auth-failed " in fields and " count=49 " in fields
    assert failed_login(throttle, digest, "10.0.0.1:2000") is True  # still held: the next interval's aggregate
    assert digest.flush()[0].count == 1


def test_a_right_password_ends_the_folding() -> None:
    throttle, digest, _clock = held_after(2)
    assert [failed_login(throttle, digest, "10.0.0.1:1") for _ in range(4)] == [False, False, True, True]
    throttle.record("10.0.0.1", accepted=True)
    assert failed_login(throttle, digest, "10.0.0.1:2") is False


def test_other_outcomes_are_never_folded() -> None:
    throttle, digest, _clock = held_after(0)
    throttle.record("10.0.0.1", accepted=False)
    entry = auth_failed("10.0.0.1:1")
    assert digest.fold(entry)
    for outcome in (Outcome.OK, Outcome.BAD_REQUEST, Outcome.DENIED):
        assert not any(digest.fold(entry._replace(outcome=outcome)) for _ in range(3))


def test_flush_writes_every_pending_aggregate_and_memory_is_bounded() -> None:
    clock = Clock()
    digest = FailedLoginDigest(lambda source: True, clock=clock, max_sources=10)
    for n in range(30):
        digest.fold(auth_failed(f"10.0.0.{n}:1"))
        digest.fold(auth_failed(f"10.0.0.{n}:2"))
    evicted = digest.due()  # sources pushed out early still get their aggregate
    assert [(e.client, e.count) for e in evicted] == [(f"10.0.0.{n}:2", 2) for n in range(20)]
    assert sorted(e.client for e in digest.flush()) == sorted(f"10.0.0.{n}:2" for n in range(20, 30))
    assert digest.flush() == []


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 15), st.booleans()), max_size=200),
       st.integers(1, 4), st.integers(0, 6))
def test_every_failure_is_in_exactly_one_line(events: list[tuple[int, float, bool]], max_sources: int,
                                              free: int) -> None:
    """Whatever the sources, timing and right passwords between: the lines written, counts
    included, add up to the failures."""
    throttle, digest, clock = held_after(free)
    digest.max_sources = max_sources
    written = failures = 0
    for source, pause, right in events:
        clock.now += pause
        written += sum(entry.count for entry in digest.due())
        if right:
            throttle.record(f"10.0.0.{source}", accepted=True)
        else:
            failures += 1
            written += 0 if failed_login(throttle, digest, f"10.0.0.{source}:1") else 1
    written += sum(entry.count for entry in digest.flush())
    assert written == failures


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def zep_guarded() -> Iterator[ZepProcess]:
    with start_zep("--direct", "--admin", "127.0.0.1:0", env={"PROXY_USERNAME": "alice", "PROXY_PASSWORD": "s3cret"}) as zp:
        yield zp


def socks_login(port: int, password: str) -> tuple[bytes, float]:
    """One RFC 1929 login; the status bytes and how long the answer took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        started = time.monotonic()
        sock.sendall(b"\x01\x05alice" + bytes([len(password)]) + password.encode())
        return recv_exactly(sock, 2), time.monotonic() - started


def http_login(port: int, password: str, url: str) -> tuple[int, float]:
    started = time.monotonic()
    result = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://alice:{password}@127.0.0.1:{port}", url)
    return int(result.stdout), time.monotonic() - started


def auth_failed_lines(zp: ZepProcess) -> list[str]:
    return [line for line in zp.access_lines() if "outcome=auth-failed" in line]


def test_socks5_guessing_slows_down_and_is_logged_in_aggregate(zep_guarded: ZepProcess) -> None:
    answers = [socks_login(zep_guarded.socks_port, f"guess-{n}") for n in range(8)]
    assert all(status == b"\x01\x01" for status, _ in answers)
    assert answers[-1][1] >= 0.4  # the eighth wrong password: 0.1, 0.2, then 0.4 s
    status, _ = socks_login(zep_guarded.socks_port, "s3cret")
    assert status == b"\x01\x00"  # the right password still gets in
    metrics = requests.get(f"http://127.0.0.1:{zep_guarded.admin_port}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("zep_login_failures_total", ())] == 8  # metrics count every attempt, folded or not
    assert samples[("zep_logins_delayed_total", ())] == 4  # the sixth to eighth guess and the right password
    failed = (("outcome", "auth-failed"), ("proto", "socks5"), ("route_kind", "-"))
    assert samples[("zep_exchanges_total", failed)] == 8
    assert zep_guarded.stop() == 0
    lines = auth_failed_lines(zep_guarded)
    assert len(lines) == 6, lines  # the first five as they are, the other three in one
    assert "count=" not in "".join(lines[:5]) and " count=3 " in lines[5]
    assert "guess" not in zep_guarded.log_text()


def test_http_guessing_slows_down_and_is_logged_in_aggregate(zep_guarded: ZepProcess, http_a: Upstream) -> None:
    url = f"http://{http_a.authority}/whoami"
    answers = [http_login(zep_guarded.http_port, f"guess-{n}", url) for n in range(8)]
    assert all(status == 407 for status, _ in answers)
    assert answers[-1][1] >= 0.4
    assert http_login(zep_guarded.http_port, "s3cret", url)[0] == 200
    assert zep_guarded.stop() == 0
    lines = auth_failed_lines(zep_guarded)
    assert len(lines) == 6, lines
    assert " count=3 " in lines[5] and "proxy credentials not accepted" in lines[5]
