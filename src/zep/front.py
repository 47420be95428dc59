"""The front of a zep that serves tenants: it accepts, negotiates and authenticates for all of
them, then hands each connection to its tenant's worker (zep.tenant_worker), which dials and
relays. The front never loads an identity and never imports the Ziti SDK.

It runs the same exchanges as a single zep, with credentials spanning every tenant. When an
exchange asks to dial, the front hands the client's socket over instead, with what the exchange
was given and what it answered (zep.replay), and the pair that logged in, so that the worker's
verifier accepts it without paying scrypt again. A handed-off connection is the worker's: the
front logs nothing for it. A tenant whose worker cannot be reached (down, or restarting) gets
SOCKS5 reply 0x01 or HTTP 503 and a log line; the other tenants notice nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Mapping, Sequence

from zep import driver
from zep.accesslog import AccessRecord
from zep.auth import Credentials
from zep.config import Settings
from zep.dial import Failure
from zep.exchange import Dial, DialFailed, Exchange
from zep.handoff import Handoff, HandoffError, WorkerLink
from zep.http_exchange import OVERLOADED, HttpExchange
from zep.replay import Recorder
from zep.routing import Router
from zep.server import Context, ProxyServer, format_address
from zep.socks_exchange import Socks5Exchange
from zep.tenant_login import Login, TenantLogins
from zep.tenants import Tenant

log = logging.getLogger("zep.front")


class FrontExchange(Recorder):
    """A recorded exchange and the credentials it checks logins with (which remember who logged in)."""

    __slots__ = ("login",)

    def __init__(self, inner: Exchange, login: Login) -> None:
        super().__init__(inner)
        self.login = login


def socks5_exchange(logins: TenantLogins) -> FrontExchange:
    login = logins.login()
    return FrontExchange(Socks5Exchange(login), login)


def http_exchange(logins: TenantLogins, max_head_bytes: int) -> FrontExchange:
    login = logins.login()
    return FrontExchange(HttpExchange(login, max_head_bytes), login)


class FrontDriver(driver.Driver):
    """A driver whose dial is a hand-off to the worker of the tenant that logged in."""

    __slots__ = ("_links",)

    def __init__(self, ctx: Context, sock: socket.socket, record: AccessRecord, exchange: FrontExchange,
                 links: Mapping[str, WorkerLink]) -> None:
        super().__init__(ctx, sock, record, exchange)
        self._links = links

    async def _dial(self, dial: Dial) -> object:
        exchange = self.exchange
        assert isinstance(exchange, FrontExchange)
        accepted = exchange.login.accepted
        if accepted is None:  # every tenant has a password, so an exchange dials only after a login
            return DialFailed(Failure.GENERAL, "no tenant logged in")
        record = self._record
        record.tenant = accepted.tenant
        queued = sum(len(chunk) for chunk in self._client.out)  # answered, not yet sent: the worker sends it
        handoff = Handoff(accepted.tenant, record.proto, record.client, accepted.username, accepted.password,
                          bytes(exchange.received), bytes(exchange.answered[:len(exchange.answered) - queued]))
        try:
            async with asyncio.timeout(self.ctx.settings.connect_timeout):
                await self._links[accepted.tenant].send(self._client.sock, handoff)
        except (HandoffError, TimeoutError) as exc:
            reason = str(exc) or f"its worker took more than {self.ctx.settings.connect_timeout:g} s (connect timeout)"
            log.warning("tenant %s: refusing a connection from %s: %s", accepted.tenant, record.client, reason)
            return DialFailed(Failure.UNAVAILABLE, f"the worker of tenant {accepted.tenant} is not available")
        self._client.out.clear()
        return driver.FINISHED


class FrontListeners:
    """The front's connections (zep.serving.Connections): the usual listeners, whose exchanges
    log in against every tenant and whose driver hands the connection over instead of dialing."""

    def __init__(self, tenants: Sequence[Tenant], sockets: Mapping[str, str]) -> None:
        self.tenants = tenants
        self.logins = TenantLogins(tenants)
        self.links = {t.name: WorkerLink(t.name, sockets[t.name]) for t in tenants}

    def open(self, server: ProxyServer) -> tuple[str | None, str | None]:
        settings, logins = server.ctx.settings, self.logins
        socks = http = None
        driver = functools.partial(FrontDriver, links=self.links)
        if settings.socks_enabled:
            listener = server.listen("socks5", settings.socks_port, lambda ctx: socks5_exchange(logins), driver=driver)
            socks = format_address(listener.address)
        if settings.http_enabled:
            listener = server.listen("http", settings.http_port,
                                     lambda ctx: http_exchange(logins, ctx.settings.max_head_bytes), OVERLOADED, driver)
            http = format_address(listener.address)
        server.add_source(self._close_links)
        return socks, http

    def describe(self, settings: Settings, router: Router, credentials: Credentials | None) -> str:
        names = ", ".join(t.name for t in self.tenants)
        return f"front for {len(self.tenants)} tenants ({names}): each login's connection goes to its tenant's worker"

    def _close_links(self) -> None:
        for link in self.links.values():
            link.close()
