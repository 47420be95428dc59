"""The router: decides which dialer carries a destination, and what happens when none does."""

from __future__ import annotations

from collections.abc import Sequence

from zep.dial import Dialer, DialError, Failure, Upstream


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
