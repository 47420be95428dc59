"""A tenant's worker: the one process that holds that tenant's identities, dialing and relaying
the connections the front hands it (zep.front).

It is a worker like those of `--workers N` (zep.worker): settings from its channel, ready and
errors reported there, stopped by the supervisor. Instead of listeners it has a hand-off socket,
at the path its hello names, in a directory only zep's user can enter; it opens it only once its
identities are loaded, so the front refuses this tenant's clients at once while it is starting.
Each hand-off is replayed (zep.replay) and then driven like any connection, with this tenant's
router and this tenant's logins only: on a kept-alive HTTP connection, a later request with
another tenant's credentials gets 407.
"""

from __future__ import annotations

import logging
import socket

from zep.accesslog import AccessRecord
from zep.auth import Credentials
from zep.config import Settings
from zep.driver import Driver
from zep.exchange import Exchange
from zep.handoff import Handoff, HandoffListener
from zep.http_exchange import HttpExchange
from zep.replay import Replay
from zep.routing import Router
from zep.server import ProxyServer
from zep.serving import describe_routes
from zep.socks_exchange import Socks5Exchange
from zep.tenant_login import TenantLogins
from zep.tenants import Tenant

log = logging.getLogger("zep.tenant")


class TenantHandoffs:
    """A tenant worker's connections (zep.serving.Connections): the front's hand-offs, each
    replayed and then driven with this tenant's router and logins."""

    def __init__(self, tenant: Tenant, path: str) -> None:
        self.tenant = tenant
        self.path = path
        self.logins = TenantLogins([tenant])
        self._server: ProxyServer | None = None

    def open(self, server: ProxyServer) -> tuple[str | None, str | None]:
        self._server = server
        listener = HandoffListener(self.path, self.adopt)
        listener.start()
        server.add_source(listener.close)
        return None, None  # no listener of its own

    def describe(self, settings: Settings, router: Router, credentials: Credentials | None) -> str:
        return f"tenant {self.tenant.name}, routes: {describe_routes(settings, router)}, connections from the front"

    def adopt(self, sock: socket.socket, handoff: Handoff) -> None:
        server = self._server
        assert server is not None
        if handoff.tenant != self.tenant.name or handoff.proto not in ("socks5", "http"):
            log.warning("tenant %s: refused a hand-off meant for tenant %s (%s)", self.tenant.name, handoff.tenant,
                        handoff.proto)
            sock.close()
            return
        self.logins.remember(handoff.user, handoff.password)
        login = self.logins.login()
        if handoff.proto == "socks5":
            inner: Exchange = Socks5Exchange(login)
        else:
            inner = HttpExchange(login, server.ctx.settings.max_head_bytes)
        record = AccessRecord(handoff.client, handoff.proto, tenant=self.tenant.name)
        server.serve_connection(Driver(server.ctx, sock, record, Replay(inner, handoff.received, handoff.sent)))
