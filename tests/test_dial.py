"""Router and direct dialer on loopback: routes, policy refusals and the errno -> reply mapping."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from zep.dial import DialError, DirectDialer, Failure, Upstream, failure_for_os_error
from zep.routing import Router
from tests.support.upstreams import closed_port


class _OnlyHost:
    """An overlay dialer that serves one host name and nothing else."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.host, self.target = host, target

    async def dial(self, host: str, port: int, timeout: float) -> Upstream | None:
        if host != self.host:
            return None
        upstream = await DirectDialer().dial(*self.target, timeout)
        return Upstream(upstream.sock, f"ziti:{host}")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_overlay_first_then_fallback(listener):
    port = listener.getsockname()[1]
    router = Router([_OnlyHost("svc.internal", ("127.0.0.1", port))], DirectDialer(), 5)

    async def routes() -> list[str]:
        found = []
        for host in ("svc.internal", "127.0.0.1"):
            upstream = await router.connect(host, port)
            found.append(upstream.route)
            upstream.sock.close()
        return found

    assert run(routes()) == ["ziti:svc.internal", "direct"]


def test_no_fallback_means_not_allowed():
    router = Router([_OnlyHost("svc.internal", ("127.0.0.1", 1))], None, 5)
    with pytest.raises(DialError) as caught:
        run(router.connect("example.test", 443))
    assert caught.value.failure is Failure.NOT_ALLOWED
    assert (caught.value.failure.socks_reply, caught.value.failure.http_status) == (0x02, 403)


def test_localhost_falls_through_families_to_the_one_listening(listener):
    """localhost may resolve to ::1 first; nothing listens there, so the IPv4 attempt must win."""
    port = listener.getsockname()[1]
    upstream = run(DirectDialer().dial("localhost", port, 5))
    with upstream.sock:
        assert upstream.sock.getpeername()[:2] == ("127.0.0.1", port)
        assert not upstream.sock.getblocking()


def test_refused_and_bad_names():
    with pytest.raises(DialError) as refused:
        run(DirectDialer().dial("127.0.0.1", closed_port(), 5))
    assert refused.value.failure is Failure.REFUSED
    assert "Connection refused" in refused.value.detail
    with pytest.raises(DialError) as bad_name:
        run(DirectDialer().dial("x" * 64 + ".example", 80, 5))
    assert bad_name.value.failure is Failure.HOST_UNREACHABLE


@pytest.mark.parametrize(("code", "failure", "reply"), [
    (errno.ENETUNREACH, Failure.NETWORK_UNREACHABLE, 0x03),
    (errno.EHOSTUNREACH, Failure.HOST_UNREACHABLE, 0x04),
    (errno.ECONNREFUSED, Failure.REFUSED, 0x05),
    (errno.ETIMEDOUT, Failure.TIMEOUT, 0x06),
    (errno.EACCES, Failure.GENERAL, 0x01),
])
def test_errno_mapping(code, failure, reply):
    assert failure_for_os_error(OSError(code, "x")) is failure
    assert failure.socks_reply == reply


def test_only_the_addresses_the_policy_allows_are_dialed():
    from zep.dial import _allowed_addresses
    from zep.egress import EgressPolicy

    addresses = [(socket.AF_INET6, ("::1", 80, 0, 0)), (socket.AF_INET, ("127.0.0.1", 80))]
    one_denied = EgressPolicy.parse(["deny ::1", "allow *"])
    assert _allowed_addresses(one_denied, "dual.example", 80, addresses) == [(socket.AF_INET, ("127.0.0.1", 80))]
    with pytest.raises(DialError) as caught:
        _allowed_addresses(EgressPolicy.parse(["deny ::1", "deny 127.0.0.0/8"]), "dual.example", 80, addresses)
    assert caught.value.failure is Failure.NOT_ALLOWED
    assert caught.value.detail == 'egress rule 1 "deny ::1" (dual.example resolves to ::1)'


def test_a_denied_resolved_address_is_never_connected(listener):
    from zep.egress import EgressPolicy

    port = listener.getsockname()[1]
    with pytest.raises(DialError) as caught:
        run(DirectDialer(EgressPolicy.parse(["deny 127.0.0.0/8", "deny ::1"])).dial("localhost", port, 5))
    assert caught.value.failure is Failure.NOT_ALLOWED and "(localhost resolves to " in caught.value.detail
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()
