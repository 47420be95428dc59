import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zep.auth import Credentials
from zep.socks5 import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    COMMAND_NOT_SUPPORTED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    SUCCEEDED,
    ConnectRequest,
    Refuse,
    Send,
    Socks5Error,
    Socks5Handshake,
    connect_reply,
)

CREDS = Credentials("alice", "s3cret")
NO_AUTH_GREETING = b"\x05\x01\x00"
AUTH_GREETING = b"\x05\x02\x00\x02"
GOOD_AUTH = b"\x01\x05alice\x06s3cret"


def request(atyp: int, address: bytes, port: int, cmd: int = 1, rsv: int = 0) -> bytes:
    return bytes([5, cmd, rsv, atyp]) + address + struct.pack(">H", port)


def domain(name: bytes, port: int = 443) -> bytes:
    return request(3, bytes([len(name)]) + name, port)


def ipv4(text: str, port: int = 80) -> bytes:
    return request(1, socket.inet_pton(socket.AF_INET, text), port)


def ipv6(text: str, port: int = 80) -> bytes:
    return request(4, socket.inet_pton(socket.AF_INET6, text), port)


def run(data: bytes, credentials: Credentials | None = None, splits=()):
    """Feed `data` whole, or cut at the given offsets; return all events.

    Like the server, stop feeding at the end of the handshake: what the client sent
    later is read from the socket and joins the request's early bytes.
    """
    hs = Socks5Handshake(credentials)
    cuts = [0, *sorted(splits), len(data)]
    events: list = []
    for start, end in zip(cuts, cuts[1:]):
        if events and isinstance(events[-1], (ConnectRequest, Refuse)):
            if isinstance(events[-1], ConnectRequest):
                req = events[-1]
                events[-1] = ConnectRequest(req.host, req.port, req.early + data[start:])
            break
        events += hs.feed(data[start:end])
    return events, hs


def refused_with(events, data: bytes) -> Refuse:
    assert isinstance(events[-1], Refuse)
    assert events[-1].data == data
    return events[-1]


class TestGreeting:
    def test_no_auth(self):
        events, hs = run(NO_AUTH_GREETING)
        assert events == [Send(b"\x05\x00")]
        assert hs.username is None

    def test_needs_more_bytes(self):
        hs = Socks5Handshake(None)
        assert hs.feed(b"") == []
        assert hs.feed(b"\x05") == []
        assert hs.feed(b"\x02\x02") == []
        assert hs.feed(b"\x00") == [Send(b"\x05\x00")]

    def test_not_socks5_just_closes(self):
        for first in (b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n", b"\x00"):
            events, _ = run(first)
            refused_with(events, b"")
            assert len(events) == 1

    def test_no_acceptable_method_without_credentials(self):
        events, _ = run(b"\x05\x01\x02")
        assert "no acceptable authentication method" in refused_with(events, b"\x05\xff").reason

    def test_no_acceptable_method_with_credentials(self):
        events, _ = run(NO_AUTH_GREETING, CREDS)
        refused_with(events, b"\x05\xff")

    def test_zero_methods(self):
        events, _ = run(b"\x05\x00")
        refused_with(events, b"\x05\xff")

    def test_picks_user_password_among_many(self):
        events, _ = run(b"\x05\x03\x00\x01\x02", CREDS)
        assert events == [Send(b"\x05\x02")]


class TestAuth:
    def test_good(self):
        events, hs = run(AUTH_GREETING + GOOD_AUTH, CREDS)
        assert events == [Send(b"\x05\x02"), Send(b"\x01\x00")]
        assert hs.username == "alice"

    def test_bad_password(self):
        events, hs = run(AUTH_GREETING + b"\x01\x05alice\x05wrong", CREDS)
        refuse = refused_with(events, b"\x01\x01")
        assert (refuse.reason, refuse.auth_failed) == ("authentication failed", True)
        assert (hs.username, hs.offered_username) == (None, "alice")

    def test_reason_never_contains_the_password(self):
        events, _ = run(AUTH_GREETING + b"\x01\x05alice\x07s3cret!", CREDS)
        assert "s3cret" not in refused_with(events, b"\x01\x01").reason

    def test_user_name_never_in_reason(self):
        # A password typed into the user-name field must not reach the log through the reason.
        events, hs = run(AUTH_GREETING + b"\x01\x06s3cret\x01x", CREDS)
        assert "s3cret" not in refused_with(events, b"\x01\x01").reason
        assert hs.offered_username == "s3cret"

    def test_bad_sub_negotiation_version(self):
        events, _ = run(AUTH_GREETING + b"\x05\x05alice\x06s3cret", CREDS)
        assert "version" in refused_with(events, b"\x01\x01").reason

    def test_empty_username_and_password(self):
        events, _ = run(AUTH_GREETING + b"\x01\x00\x00", CREDS)
        refused_with(events, b"\x01\x01")
        events, hs = run(AUTH_GREETING + b"\x01\x00\x00", Credentials("", ""))
        assert events[-1] == Send(b"\x01\x00")
        assert hs.username == ""

    def test_non_utf8_username_is_replaced(self):
        _, hs = run(AUTH_GREETING + b"\x01\x01\xff\x01p", CREDS)
        assert hs.offered_username == "\ufffd"

    def test_undecodable_configured_secret_matches_its_raw_bytes(self):
        creds = Credentials("\udcff", "p")  # how the environment hands over byte 0xff
        events, hs = run(AUTH_GREETING + b"\x01\x01\xff\x01p", creds)
        assert events[-1] == Send(b"\x01\x00")
        assert hs.username == "\ufffd"


class TestRequest:
    def test_ipv4(self):
        events, _ = run(NO_AUTH_GREETING + ipv4("10.1.2.3", 8080))
        assert events[-1] == ConnectRequest("10.1.2.3", 8080, b"")

    def test_ipv6(self):
        events, _ = run(NO_AUTH_GREETING + ipv6("2001:db8::1", 443))
        assert events[-1] == ConnectRequest("2001:db8::1", 443, b"")

    def test_ipv4_mapped_ipv6(self):
        events, _ = run(NO_AUTH_GREETING + ipv6("::ffff:127.0.0.1", 1))
        assert events[-1] == ConnectRequest("::ffff:127.0.0.1", 1, b"")

    def test_domain_kept_exactly_as_sent(self):
        events, _ = run(NO_AUTH_GREETING + domain(b"My-Service.Ziti.", 65535))
        assert events[-1] == ConnectRequest("My-Service.Ziti.", 65535, b"")

    def test_punycode_domain(self):
        events, _ = run(NO_AUTH_GREETING + domain(b"xn--bcher-kva.example"))
        assert events[-1].host == "xn--bcher-kva.example"

    def test_early_bytes(self):
        events, _ = run(NO_AUTH_GREETING + domain(b"a.b") + b"\x16\x03\x01 client hello")
        assert events[-1] == ConnectRequest("a.b", 443, b"\x16\x03\x01 client hello")

    def test_whole_exchange_in_one_packet_with_auth(self):
        events, hs = run(AUTH_GREETING + GOOD_AUTH + domain(b"svc.ziti") + b"GET /", CREDS)
        assert events == [Send(b"\x05\x02"), Send(b"\x01\x00"), ConnectRequest("svc.ziti", 443, b"GET /")]
        assert hs.username == "alice"

    @pytest.mark.parametrize("cmd", [0, 2, 3, 4, 0xFF])
    def test_unsupported_commands(self, cmd):
        events, _ = run(NO_AUTH_GREETING + request(1, b"\x7f\x00\x00\x01", 80, cmd=cmd))
        refused_with(events, connect_reply(COMMAND_NOT_SUPPORTED))

    def test_command_refused_before_the_address_arrives(self):
        events, _ = run(NO_AUTH_GREETING + b"\x05\x02\x00\x01")
        refused_with(events, connect_reply(COMMAND_NOT_SUPPORTED))

    @pytest.mark.parametrize("atyp", [0, 2, 5, 0xFF])
    def test_unknown_address_type(self, atyp):
        events, _ = run(NO_AUTH_GREETING + bytes([5, 1, 0, atyp]))
        refused_with(events, connect_reply(ADDRESS_TYPE_NOT_SUPPORTED))

    def test_bad_version_in_request(self):
        events, _ = run(NO_AUTH_GREETING + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
        refused_with(events, connect_reply(GENERAL_FAILURE))

    def test_reserved_byte_is_ignored(self):
        events, _ = run(NO_AUTH_GREETING + request(1, b"\x7f\x00\x00\x01", 80, rsv=0xAA))
        assert events[-1] == ConnectRequest("127.0.0.1", 80, b"")

    def test_empty_domain(self):
        events, _ = run(NO_AUTH_GREETING + b"\x05\x01\x00\x03\x00")
        refused_with(events, connect_reply(GENERAL_FAILURE))

    @pytest.mark.parametrize("name", [b"a b", b"a\x00b", b"caf\xc3\xa9.fr", b"\x7f", b"tab\there", b"nl\n"])
    def test_unusable_domain(self, name):
        events, _ = run(NO_AUTH_GREETING + domain(name))
        refused_with(events, connect_reply(HOST_UNREACHABLE))

    def test_port_zero(self):
        events, _ = run(NO_AUTH_GREETING + ipv4("1.2.3.4", 0))
        assert "port 0" in refused_with(events, connect_reply(GENERAL_FAILURE)).reason

    def test_partial_request_needs_more(self):
        data = NO_AUTH_GREETING + domain(b"example.com")
        hs = Socks5Handshake(None)
        assert hs.feed(data[:-1]) == [Send(b"\x05\x00")]
        assert hs.feed(data[-1:]) == [ConnectRequest("example.com", 443, b"")]


class TestMisuse:
    def test_feed_after_connect_request(self):
        _, hs = run(NO_AUTH_GREETING + ipv4("1.2.3.4"))
        with pytest.raises(Socks5Error):
            hs.feed(b"x")

    def test_feed_after_refuse(self):
        _, hs = run(b"\x04")
        with pytest.raises(Socks5Error):
            hs.feed(b"")


class TestConnectReply:
    def test_default_is_zero_address(self):
        assert connect_reply(SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"

    def test_ipv4(self):
        assert connect_reply(SUCCEEDED, ("127.0.0.1", 1080)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"

    def test_ipv6_getsockname_tuple(self):
        reply = connect_reply(CONNECTION_REFUSED, ("::1", 443, 0, 0))
        assert reply == b"\x05\x05\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb"

    def test_ipv6_scope_dropped(self):
        reply = connect_reply(SUCCEEDED, ("fe80::1%lo", 1, 0, 1))
        assert reply == b"\x05\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, "fe80::1") + b"\x00\x01"

    def test_not_an_ip(self):
        with pytest.raises(ValueError):
            connect_reply(SUCCEEDED, ("localhost", 80))


# Property tests

TERMINAL = (ConnectRequest, Refuse)


def feed_until_done(credentials, chunks):
    hs = Socks5Handshake(credentials)
    events = []
    for chunk in chunks:
        events += hs.feed(chunk)
        if events and isinstance(events[-1], TERMINAL):
            break
    return events


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.lists(st.binary(max_size=40), max_size=8))
def test_arbitrary_bytes_only_produce_events(with_auth, chunks):
    events = feed_until_done(CREDS if with_auth else None, chunks)
    assert all(isinstance(e, (Send, ConnectRequest, Refuse)) for e in events)
    assert not any(isinstance(e, TERMINAL) for e in events[:-1])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30), st.binary(max_size=60))
def test_arbitrary_bytes_after_a_valid_greeting(auth_tail, rest):
    # Reach the auth and request phases with random input too.
    for creds, prefix in ((CREDS, AUTH_GREETING), (CREDS, AUTH_GREETING + GOOD_AUTH), (None, NO_AUTH_GREETING)):
        events = feed_until_done(creds, [prefix, auth_tail, rest])
        assert all(isinstance(e, (Send, ConnectRequest, Refuse)) for e in events)


short_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # < 256 bytes as UTF-8
hostnames = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", fullmatch=True)
ports = st.integers(1, 65535)
destinations = st.one_of(
    st.tuples(st.just(1), st.ip_addresses(v=4).map(str), ports),
    st.tuples(st.just(4), st.ip_addresses(v=6).map(lambda ip: socket.inet_ntop(socket.AF_INET6, ip.packed)), ports),
    st.tuples(st.just(3), hostnames, ports),
)


@st.composite
def handshakes(draw):
    """A valid client handshake, with its credentials and the events it must produce."""
    atyp, host, port = draw(destinations)
    if atyp == 1:
        req = ipv4(host, port)
    elif atyp == 4:
        req = ipv6(host, port)
    else:
        req = domain(host.encode(), port)
    early = draw(st.binary(max_size=20))
    extra_methods = draw(st.lists(st.integers(0, 0xFE), max_size=5))
    if draw(st.booleans()):
        creds = Credentials(draw(short_text), draw(short_text))
        raw_user, raw_password = creds.username.encode(), creds.password.encode()
        methods = bytes(sorted(set(extra_methods + [2])))
        greeting = bytes([5, len(methods)]) + methods
        auth = bytes([1, len(raw_user)]) + raw_user + bytes([len(raw_password)]) + raw_password
        expected = [Send(b"\x05\x02"), Send(b"\x01\x00")]
        data = greeting + auth + req + early
    else:
        creds = None
        methods = bytes(sorted(set(extra_methods + [0])))
        expected = [Send(b"\x05\x00")]
        data = bytes([5, len(methods)]) + methods + req + early
    return creds, data, expected + [ConnectRequest(host, port, early)]


@settings(max_examples=300, deadline=None)
@given(handshakes(), st.data())
def test_valid_handshake_any_split_gives_the_same_events(handshake, data):
    creds, raw, expected = handshake
    assert run(raw, creds)[0] == expected
    splits = data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    assert run(raw, creds, splits)[0] == expected


@settings(max_examples=40, deadline=None)
@given(handshakes())
def test_valid_handshake_split_at_every_boundary(handshake):
    creds, raw, expected = handshake
    for cut in range(len(raw) + 1):
        assert run(raw, creds, [cut])[0] == expected
    assert run(raw, creds, range(len(raw)))[0] == expected  # one byte at a time
