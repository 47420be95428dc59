"""Replaying a handed-off exchange in a tenant's worker (in process, sans-IO): a fresh exchange fed
what the front recorded says nothing the client already has, then carries on exactly like the
front's exchange would have."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from zep.exchange import ClientData, Close, Command, Dial, Dialed, Log, Login, SendClient, Tunnel, UpstreamData
from zep.http_exchange import HttpExchange
from zep.outcome import Outcome
from zep.passwords import hash_password
from zep.replay import Recorder, Replay
from zep.socks_exchange import Socks5Exchange
from zep.tenant_login import TenantLogins
from zep.tenants import Tenant

LOGINS = TenantLogins([Tenant("team-a", "alice", hash_password("s3cret"))])
GREETING = b"\x05\x01\x02"  # user/password only
AUTH = b"\x01\x05alice\x06s3cret"
REQUEST = b"\x05\x01\x00\x03\x08svc.test\x00\x50"  # CONNECT svc.test:80
EARLY = b"GET / HTTP/1.1\r\n\r\n"
BASIC = base64.b64encode(b"alice:s3cret").decode()


def record(exchange, chunks: list[bytes]) -> tuple[Recorder, list[Command]]:
    """Feed the chunks to a recorded exchange until it asks to dial; the commands it gave."""
    recorder = Recorder(exchange)
    commands = recorder.start()
    for chunk in chunks:
        assert not any(isinstance(c, Dial) for c in commands)
        commands += recorder.handle(ClientData(chunk))
    assert isinstance(commands[-1], Dial), commands
    return recorder, commands


def sent(commands: list[Command]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, SendClient))


def without_sends(commands: list[Command]) -> list[Command]:
    """What else the exchange asked for (the front's throttle had the Login)."""
    return [c for c in commands if not isinstance(c, (SendClient, Login))]


DIALED = Dialed("ziti:svc-a", ("127.0.0.1", 40000))


def test_socks5_replay_says_nothing_already_said_then_tunnels_like_the_front_would():
    front, commands = record(Socks5Exchange(LOGINS.login()), [GREETING, AUTH, REQUEST + EARLY])
    assert bytes(front.answered) == sent(commands) == b"\x05\x02\x01\x00"
    assert bytes(front.received) == GREETING + AUTH + REQUEST + EARLY
    replay = Replay(Socks5Exchange(LOGINS.login()), bytes(front.received), bytes(front.answered))
    replayed = replay.start()
    assert sent(replayed) == b"" and not any(isinstance(c, Login) for c in replayed)
    assert without_sends(replayed) == without_sends(commands)  # the same timers, the same Dial
    assert replay.handle(DIALED) == front.handle(DIALED)  # the same reply, the same Tunnel with the early bytes


def test_what_the_front_had_not_sent_yet_is_sent_by_the_worker():
    front, _ = record(Socks5Exchange(LOGINS.login()), [GREETING + AUTH + REQUEST])
    replay = Replay(Socks5Exchange(LOGINS.login()), bytes(front.received), bytes(front.answered[:1]))
    assert sent(replay.start()) == bytes(front.answered[1:])


def test_a_replay_that_differs_from_what_the_front_sent_resets_the_connection():
    front, _ = record(Socks5Exchange(LOGINS.login()), [GREETING + AUTH + REQUEST])
    for claimed in (b"\x05\x00\x01\x00", bytes(front.answered) + b"\x00"):
        commands = Replay(Socks5Exchange(LOGINS.login()), bytes(front.received), claimed).start()
        assert commands[-1] == Close(abort=True)
        assert [c.report.outcome for c in commands if isinstance(c, Log)] == [Outcome.INTERNAL_ERROR]
        assert sent(commands) == b""


def test_http_connect_and_forwarded_requests_replay_to_the_same_commands():
    connect = (f"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\nProxy-Authorization: Basic {BASIC}\r\n\r\n"
               ).encode() + b"\x16\x03\x01"
    forward = (f"POST http://svc.test/upload?token=x HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 10\r\n"
               f"Proxy-Authorization: Basic {BASIC}\r\n\r\n").encode() + b"01234"
    for request in (connect, forward):
        front, commands = record(HttpExchange(LOGINS.login(), 65536), [request[:20], request[20:]])
        replay = Replay(HttpExchange(LOGINS.login(), 65536), bytes(front.received), bytes(front.answered))
        assert without_sends(replay.start()) == without_sends(commands)
        assert replay.handle(DIALED) == front.handle(DIALED)


def test_on_a_kept_alive_connection_only_the_tenant_s_own_login_is_accepted():
    """A worker's replay checks with its own tenant's logins: another tenant's credentials on a
    later request of the same connection get 407 and the connection closes."""
    other = TenantLogins([Tenant("team-b", "bob", hash_password("b-pass"))])
    worker_logins = LOGINS  # the worker of team-a knows team-a only
    request = (f"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nProxy-Authorization: Basic {BASIC}\r\n\r\n"
               ).encode()
    front, _ = record(HttpExchange(LOGINS.login(), 65536), [request])
    replay = Replay(HttpExchange(worker_logins.login(), 65536), bytes(front.received), bytes(front.answered))
    replay.start()
    replay.handle(DIALED)
    done = replay.handle(UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert sent(done).endswith(b"ok")
    bob = base64.b64encode(b"bob:b-pass").decode()
    assert other.login().matches("bob", "b-pass")
    second = replay.handle(ClientData((f"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\n"
                                       f"Proxy-Authorization: Basic {bob}\r\n\r\n").encode()))
    assert sent(second).startswith(b"HTTP/1.1 407 ")
    assert [c.report.user for c in second if isinstance(c, Log)] == ["?"]
    assert isinstance(second[-1], Close)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(GREETING + AUTH + REQUEST + EARLY) - 1), unique=True,
                max_size=8))
def test_however_the_front_read_the_bytes_the_replay_ends_the_same(cuts):
    """The front reads the client in whatever pieces the network gives; the worker gets them in one:
    the commands that matter (the dial, then the reply and the tunnel) are the same."""
    data = GREETING + AUTH + REQUEST + EARLY
    points = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    recorder = Recorder(Socks5Exchange(LOGINS.login()))
    commands = recorder.start()
    for chunk in chunks:
        if commands and isinstance(commands[-1], Dial):
            break  # the front stops reading once the exchange dials
        commands += recorder.handle(ClientData(chunk))
    assert isinstance(commands[-1], Dial)
    replay = Replay(Socks5Exchange(LOGINS.login()), bytes(recorder.received), bytes(recorder.answered))
    replayed = replay.start()
    assert replayed[-1] == commands[-1]
    after = replay.handle(DIALED)
    assert after == recorder.handle(DIALED)
    assert isinstance(after[-1], Tunnel)
