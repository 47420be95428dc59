"""The router: decides which dialer carries a destination, and what happens when none does."""

from __future__ import annotations

from collections.abc import Sequence

from zep.dial import Dialer, DialError, DirectDialer, Failure, Upstream
from zep.egress import EgressPolicy
from zep.upstream import UpstreamProxy
from zep.upstream_dial import UpstreamProxyDialer


class Router:
    """Asks each overlay dialer in turn; the first that has a route wins.

    When none has one, the fallback dialer (direct) carries the connection, or, with no
    fallback (the `deny` policy), the connection is refused as not allowed by policy.
    """

    def __init__(self, dialers: Sequence[Dialer], fallback: Dialer | None, connect_timeout: float) -> None:
        self.dialers = tuple(dialers)
        self.fallback = fallback
        self.connect_timeout = connect_timeout

    async def connect(self, host: str, port: int) -> Upstream:
        for dialer in self.dialers:
            upstream = await dialer.dial(host, port, self.connect_timeout)
            if upstream is not None:
                return upstream
        if self.fallback is None:
            raise DialError(Failure.NOT_ALLOWED, f"no Ziti service intercepts {host}:{port} and the fallback policy is deny")
        upstream = await self.fallback.dial(host, port, self.connect_timeout)
        if upstream is None:
            raise DialError(Failure.HOST_UNREACHABLE, f"no route to {host}:{port}")
        return upstream

    def direct_dialer(self, host: str, port: int) -> DirectDialer | None:
        """The direct dialer that carries (host, port) when no overlay dialer has to be asked first,
        else None: then only `connect()` can say (the fast path dials such routes itself)."""
        if self.dialers:
            return None
        fallback = self.fallback
        if isinstance(fallback, ProxyOrDirect):
            return fallback.direct if fallback.no_proxy.matches(host, port) else None
        return fallback if isinstance(fallback, DirectDialer) else None


class ProxyOrDirect:
    """The fallback route through an upstream proxy: its no-proxy exceptions go direct.

    The egress policy applies on both paths: by name and by every resolved address when direct,
    by name (and IP literal) through the proxy, which resolves names itself.
    """

    def __init__(self, proxy: UpstreamProxy, policy: EgressPolicy) -> None:
        self.no_proxy = proxy.no_proxy
        self.direct = DirectDialer(policy)
        self.via_proxy = UpstreamProxyDialer(proxy, policy)

    async def dial(self, host: str, port: int, timeout: float) -> Upstream:
        dialer = self.direct if self.no_proxy.matches(host, port) else self.via_proxy
        return await dialer.dial(host, port, timeout)


def fallback_dialer(route: str, policy: EgressPolicy, proxy: UpstreamProxy | None) -> Dialer | None:
    """What carries destinations no overlay dialer serves: `direct`, `proxy` or `deny` (None).

    Built from values a tenant can carry, the global settings being the default."""
    if route == "deny":
        return None
    if route == "proxy":
        if proxy is None:
            raise ValueError("the proxy fallback needs an upstream proxy")
        return ProxyOrDirect(proxy, policy)
    return DirectDialer(policy)
