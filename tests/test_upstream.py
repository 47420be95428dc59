"""Upstream proxy settings: URL parsing (credentials never echoed) and NO_PROXY-style exceptions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zep.errors import ConfigError
from zep.upstream import NoProxy, UpstreamProxy

SECRET = "s3cr3t%2Fpass"


@pytest.mark.parametrize(("url", "expected"), [
    ("http://corp-proxy:3128", ("http", "corp-proxy", 3128, "", "")),
    ("http://corp-proxy", ("http", "corp-proxy", 80, "", "")),
    (f"http://ci%40corp:{SECRET}@corp-proxy:3128/", ("http", "corp-proxy", 3128, "ci@corp", "s3cr3t/pass")),
    ("socks5h://u:p@[::1]:1081", ("socks5h", "::1", 1081, "u", "p")),
    ("SOCKS5H://gw.example", ("socks5h", "gw.example", 1080, "", "")),
])
def test_proxy_urls(url, expected):
    proxy = UpstreamProxy.parse(url)
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username, proxy.password) == expected
    assert "@" not in proxy.label and "pass" not in proxy.label and "pass" not in repr(proxy)


def test_label_brackets_ipv6():
    assert UpstreamProxy.parse("socks5h://u:p@[::1]:1081").label == "socks5h://[::1]:1081"


@pytest.mark.parametrize(("url", "why"), [
    (f"socks5://u:{SECRET}@h:1080", "socks5h:// passes names unresolved"),
    (f"https://u:{SECRET}@h:443", "http:// or socks5h://"),
    (f"u:{SECRET}@h:3128", "http:// or socks5h://"),
    (f"http://u:{SECRET}@h:99999", "malformed (bad port)"),
    (f"http://u:{SECRET}@h:port", "malformed (bad port)"),
    (f"http://u:{SECRET}@", "has no host"),
    (f"http://u:{SECRET}@h:3128/path", "must not have a path"),
    (f"socks5h://{'u' * 256}:{SECRET}@h", "at most 255 bytes"),
])
def test_bad_proxy_urls_never_repeat_the_credentials(url, why):
    with pytest.raises(ConfigError) as caught:
        UpstreamProxy.parse(url)
    assert why in str(caught.value) and "s3cr3t" not in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20))
def test_any_url_parses_or_fails_without_echoing_the_password(prefix, suffix):
    url = f"{prefix}://user:{SECRET}@{suffix}"
    try:
        UpstreamProxy.parse(url)
    except ConfigError as exc:
        assert "s3cr3t" not in str(exc)


@pytest.mark.parametrize(("text", "yes", "no"), [
    ("*", [("anything.example", 1), ("10.0.0.1", 443)], []),
    ("example.com", [("example.com", 80), ("www.example.COM.", 443)], [("notexample.com", 80), ("example.com.evil", 80)]),
    (".example.com", [("example.com", 80), ("a.b.example.com", 80)], [("xexample.com", 80)]),
    ("*.example.com", [("example.com", 80), ("a.example.com", 80)], [("example.org", 80)]),
    ("10.0.0.0/8, 192.168.1.5", [("10.2.3.4", 80), ("192.168.1.5", 22)], [("192.168.1.6", 80), ("ten.example", 80)]),
    ("::1 [fd00::1]:8443", [("::1", 80), ("fd00::1", 8443)], [("fd00::1", 443)]),
    ("localhost:8080 internal.example:443", [("localhost", 8080), ("git.internal.example", 443)],
     [("localhost", 8081), ("internal.example", 80)]),
])
def test_no_proxy_entries(text, yes, no):
    exceptions = NoProxy.parse(text)
    assert all(exceptions.matches(host, port) for host, port in yes)
    assert not any(exceptions.matches(host, port) for host, port in no)


@pytest.mark.parametrize("text", ["a.example:http", "[::1", "10.0.0.0/33", "a.example:0", "h/x"])
def test_bad_no_proxy_entries_are_named(text):
    with pytest.raises(ConfigError, match="no-proxy entry"):
        NoProxy.parse(f"ok.example, {text}")


def test_the_dialer_returns_the_bytes_that_came_with_the_connect_answer():
    import asyncio

    from tests.support.connect_proxy import EARLY_BYTES, connect_proxy
    from zep.upstream_dial import UpstreamProxyDialer

    with connect_proxy("u", "p") as proxy:
        upstream = asyncio.run(UpstreamProxyDialer(UpstreamProxy.parse(proxy.url())).dial("early.test", 25, 5))
    with upstream.sock:
        assert (upstream.route, upstream.early_down) == ("proxy", EARLY_BYTES)


def test_the_proxy_route_is_a_bounded_route_kind():
    from zep.accesslog import AccessEntry
    from zep.outcome import Outcome

    entry = AccessEntry("127.0.0.1:1", "socks5", "a.example:443", "proxy", "-", 0, 0, 0.0, Outcome.OK)
    assert entry.route_kind == "proxy"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=48) | st.sampled_from([b"\x05\x02\x01\x00", b"\x05\x00\x05\x00\x01", b"\x05\x00\x05\x00\x03\xff",
                                                 b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 999 \r\n\r\n", b"\x05\xff"]),
       st.sampled_from(["http", "socks5h"]), st.booleans())
def test_any_proxy_answer_gives_a_tunnel_or_a_dial_error(answer, scheme, credentials):
    """Whatever a broken proxy sends and then closes, the dialer ends with an Upstream or a DialError."""
    import asyncio

    from zep.dial import DialError
    from zep.upstream_dial import UpstreamProxyDialer

    async def exchange() -> None:
        async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1024)
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        userinfo = "u:p@" if credentials else ""
        dialer = UpstreamProxyDialer(UpstreamProxy.parse(f"{scheme}://{userinfo}127.0.0.1:{port}"))
        try:
            upstream = await dialer.dial("example.test", 443, 5)
            upstream.sock.close()
        except DialError as exc:
            assert exc.detail.startswith("upstream proxy ") and "u:p" not in exc.detail
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(exchange())
