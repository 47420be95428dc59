"""Running the proxy: dialers from Settings, the listeners, the ready file, and when to stop.

`zep serve` runs until SIGTERM or SIGINT; `zep run` runs until its command ends (a `Job`, see
jobrun.py). Both start here, so both get the same hardening, the same ready file rules and the
same routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import zep
from zep import fdlimit, hardening, readyfile, relay
from zep.auth import Credentials, random_credentials
from zep.config import Settings
from zep.dial import Dialer
from zep.proxy_env import remove_self_proxies
from zep.readyfile import Ready, ReadyFileError
from zep.relay_result import RelayUnavailable
from zep.routing import Router, fallback_dialer

if TYPE_CHECKING:
    from zep.server import ProxyServer
    from zep.admin import AdminServer
    from zep.metrics import Metrics
    from zep.ziti import ZitiDialer

log = logging.getLogger("zep")

EXIT_CONFIG = 2
EXIT_RELAY = 1  # the relay could not start (the environment, not the configuration)

# Runs once the proxy is ready; its result is zep's exit status.
Job = Callable[[Ready], Awaitable[int]]


class Role(Protocol):
    """What differs between a stand-alone zep and a worker process of `zep serve --workers` (zep.worker)."""

    reuse_port: bool  # share the listening ports with other processes (SO_REUSEPORT)

    def ready(self, ready: Ready) -> None: ...  # listening, and the ready file (if any) written

    def fail(self, message: str) -> None: ...  # cannot start; an exit status follows

    def watch(self, stop: Callable[[], None]) -> None: ...  # other reasons to stop than SIGTERM/SIGINT

    def share_metrics(self, metrics: Metrics) -> bool: ...  # True: someone else scrapes them (the supervisor)


class Standalone:
    """One process serving the listeners itself: its ready file says it all, and it prints its errors."""

    reuse_port = False

    def ready(self, ready: Ready) -> None:
        pass

    def fail(self, message: str) -> None:
        print(f"zep: error: {message}", file=sys.stderr)

    def watch(self, stop: Callable[[], None]) -> None:
        pass

    def share_metrics(self, metrics: Metrics) -> bool:
        return False


def proxy_credentials(settings: Settings) -> Credentials | None:
    if settings.random_credentials:
        return random_credentials()
    return Credentials(settings.username, settings.password) if settings.auth_required else None


def run_proxy(settings: Settings, job: Job | None = None, connections: Connections | None = None,
              role: Role | None = None) -> int:
    """Serve until stopped (no job) or until `job` returns; the exit status."""
    import uvloop

    role = role or Standalone()
    if not settings.dumpable:
        hardening.make_undumpable()
    open_files = fdlimit.raise_open_files_limit()  # before the engine and the SDK open theirs
    try:
        relay.start()  # before anything listens: a relay that cannot run is a start-up error
    except RelayUnavailable as exc:
        role.fail(str(exc))
        return EXIT_RELAY
    listening = [(settings.socks_enabled, settings.socks_port), (settings.http_enabled, settings.http_port)]
    remove_self_proxies(os.environ, settings.proxy_host, [port for enabled, port in listening if enabled])
    try:
        if settings.ready_file:
            readyfile.claim(settings.ready_file)
    except ReadyFileError as exc:
        role.fail(str(exc))
        return EXIT_CONFIG
    try:
        return uvloop.run(_start(settings, open_files, job, connections or Listeners(), role))
    except (OSError, ReadyFileError) as exc:
        role.fail(str(getattr(exc, "strerror", None) or exc))
        return EXIT_CONFIG


class _Signals:
    """SIGTERM and SIGINT set `stop` (a job takes them over once it runs, see jobrun.py)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._received, signum)

    def _received(self, signum: int) -> None:
        self.received.append(signum)
        self.stop.set()


@dataclasses.dataclass
class _Status:
    """What the admin listener reports: the metrics, and why zep is not ready (None once it is)."""

    metrics: Metrics
    not_ready: str | None = "opening listeners"
    admin: str | None = None  # the admin listener's address
    server: ProxyServer | None = None  # once the listeners are open

    def why_not_ready(self) -> str | None:
        if self.server is not None and self.server.draining:
            return "draining"
        return self.not_ready


async def _start(settings: Settings, open_files: fdlimit.OpenFiles, job: Job | None,
                 connections: Connections, role: Role) -> int:
    """The admin listener first (so a probe can tell "starting" from "dead"), then the identities
    (on a thread, the loop answering meanwhile), then the proxy."""
    from zep.metrics import Metrics
    from zep.ziti import ZitiSetupError

    signals = _Signals()  # before readiness: a SIGTERM right after it must find the handlers
    role.watch(signals.stop.set)
    status = _Status(Metrics(version=zep.__version__, relay=relay.IMPLEMENTATION, relay_stats=relay.stats))
    admin = await _start_admin(settings, status) if settings.admin_address else None
    scraped = admin is not None or role.share_metrics(status.metrics)
    ziti_runtime = None
    try:
        if settings.ziti_configured:
            status.not_ready = "loading Ziti identities"
            try:
                ziti_runtime = await _start_ziti(settings, signals.stop)
            except ZitiSetupError as exc:
                role.fail(str(exc))
                return EXIT_CONFIG
            if ziti_runtime is None:
                return 128 + signals.received[0] if signals.received else 0
            status.metrics.identities_loaded = len(ziti_runtime.identities)
            status.metrics.set_sdk_version(ziti_runtime.sdk_version)
            status.not_ready = "opening listeners"
        settings = _fit_open_files(settings, open_files)
        router = Router([ziti_runtime] if ziti_runtime else [], _fallback(settings), settings.connect_timeout)
        return await _serve(settings, router, job, signals, status, connections, role, scraped)
    finally:
        if admin is not None:
            admin.close()
        if ziti_runtime is not None:
            ziti_runtime.close()


class Connections(Protocol):
    """Where a zep process's connections come from: its own listeners, or (tenants) the front's
    listeners that hand off (zep.front) and a tenant worker's hand-off socket (zep.tenant_worker)."""

    def open(self, server: ProxyServer) -> tuple[str | None, str | None]: ...  # SOCKS5 and HTTP addresses

    def describe(self, settings: Settings, router: Router, credentials: Credentials | None) -> str: ...


class Listeners:
    """The SOCKS5 and HTTP listeners, each connection driven with its protocol's exchange."""

    def open(self, server: ProxyServer) -> tuple[str | None, str | None]:
        from zep.http_exchange import OVERLOADED, HttpExchange
        from zep.server import format_address
        from zep.socks_exchange import Socks5Exchange

        settings = server.ctx.settings
        socks = http = None
        if settings.socks_enabled:
            listener = server.listen("socks5", settings.socks_port, lambda ctx: Socks5Exchange(ctx.credentials))
            socks = format_address(listener.address)
        if settings.http_enabled:
            listener = server.listen("http", settings.http_port,
                                     lambda ctx: HttpExchange(ctx.credentials, ctx.settings.max_head_bytes), OVERLOADED)
            http = format_address(listener.address)
        return socks, http

    def describe(self, settings: Settings, router: Router, credentials: Credentials | None) -> str:
        return (f"routes: {describe_routes(settings, router)}, "
                f"authentication {_describe_authentication(settings, credentials)}")


async def _serve(settings: Settings, router: Router, job: Job | None, signals: _Signals, status: _Status,
                 connections: Connections, role: Role, scraped: bool) -> int:
    from zep import accesslog
    from zep.server import Context, ProxyServer
    from zep.throttle import FailedLoginDigest, write_digests

    credentials = proxy_credentials(settings)
    server = ProxyServer(Context(settings, router, relay.relay, credentials, relay.ready, start_pair=relay.start_pair,
                                 start_socks=relay.start_socks),
                         reuse_port=role.reuse_port)
    digests = asyncio.create_task(write_digests(FailedLoginDigest(server.ctx.logins.holds)))
    metrics = status.metrics
    metrics.server, metrics.logins, metrics.max_connections = server, server.ctx.logins, server.max_connections
    status.server = server
    if scraped:  # nobody else reads the metrics
        accesslog.subscribe(metrics.observe)
    try:
        socks, http = connections.open(server)
    except BaseException:
        server.stop_accepting()
        raise
    ready = Ready(os.getpid(), socks, http, credentials, settings.no_proxy, status.admin)
    status.not_ready = None
    # What start-up built lives as long as zep: out of the collector's way, so that collections
    # (set off by the objects each connection makes) look at the connections' objects alone.
    gc.freeze()
    log.info("zep %s ready: relay=%s, %s", zep.__version__, relay.IMPLEMENTATION,
             connections.describe(settings, router, credentials))
    try:
        with readyfile.published(settings.ready_file, ready):
            role.ready(ready)
            return await (job(ready) if job is not None else _until_stopped(server, settings.drain_timeout, signals))
    finally:
        status.not_ready = "stopping"
        if server.open_connections:
            log.info("stopping: no new connections; closing %d open ones", server.open_connections)
        await server.shutdown()
        digests.cancel()  # writes what it still holds
        await asyncio.gather(digests, return_exceptions=True)


async def _until_stopped(server: ProxyServer, drain_timeout: float, signals: _Signals) -> int:
    """Until SIGTERM or SIGINT (or what else the role watches), then drain (a second signal stops at once)."""
    signalled = signals.stop
    await signalled.wait()
    signalled.clear()
    log.info("draining: no new connections; %d open ones may finish within %g s (ZEP_DRAIN_TIMEOUT), "
             "a second signal stops at once", server.open_connections, drain_timeout)
    draining = asyncio.ensure_future(server.drain(drain_timeout))
    second = asyncio.ensure_future(signalled.wait())
    await asyncio.wait([draining, second], return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if not draining.done():
        log.info("stopping at once: closing %d open connections", server.open_connections)
        await server.shutdown()
    await draining
    return 0


async def _start_admin(settings: Settings, status: _Status) -> AdminServer:
    from zep import admin
    from zep.server import format_address

    assert settings.admin_address is not None
    server = await admin.start(admin.Admin(status.metrics, status.why_not_ready),
                               admin.listen_socket(settings.admin_address), settings.http_request_timeout)
    status.admin = format_address(server.address)
    return server


async def _start_ziti(settings: Settings, stop: asyncio.Event) -> ZitiDialer | None:
    """The loaded identities' dialer; None when zep is told to stop first; raises ZitiSetupError."""
    from zep import ziti

    loading = asyncio.ensure_future(ziti.start_in_thread(settings))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not loading.done():
        loading.cancel()
        log.info("stopping while Ziti identities load")
        return None
    return loading.result()


def _fallback(settings: Settings) -> Dialer | None:
    """The dialer for what no Ziti service carries, by the fallback policy and the egress rules."""
    policy, upstream = settings.egress_policy(), settings.upstream()
    if settings.fallback == "deny" and not policy.open:
        log.warning("ZEP_EGRESS / --egress has no effect: with the fallback deny, nothing is dialed outside Ziti")
    if upstream is not None and settings.fallback != "proxy":
        log.warning("the upstream proxy %s is not used: the fallback is %s", upstream.label, settings.fallback)
    return fallback_dialer(settings.fallback, policy, upstream)


def _fit_open_files(settings: Settings, open_files: fdlimit.OpenFiles) -> Settings:
    """maxconn from the open-files limit unless configured; logs the choice, warns when it does not fit."""
    fits = fdlimit.max_connections_for(open_files.limit, settings.ziti_configured)
    raised = f" (raised from {open_files.before})" if open_files.limit != open_files.before else ""
    if not settings.max_connections:
        log.info("open files: limit %d%s; maxconn %d (fits the limit)", open_files.limit, raised, fits)
        return dataclasses.replace(settings, max_connections=fits)
    if settings.max_connections > fits:
        log.warning("open files: limit %d%s; maxconn %d (configured) does not fit: past about %d connections, "
                    "accepts pause and dials fail for want of file descriptors", open_files.limit, raised,
                    settings.max_connections, fits)
    else:
        log.info("open files: limit %d%s; maxconn %d (configured)", open_files.limit, raised, settings.max_connections)
    return settings


def describe_routes(settings: Settings, router: Router) -> str:
    first = "Ziti services first, anything else" if router.dialers else "every destination (--direct)"
    if settings.fallback == "deny":
        return f"{first}: deny"
    route = settings.fallback
    upstream = settings.upstream()
    if route == "proxy" and upstream is not None:
        route = f"through the upstream proxy {upstream.label}"
        if upstream.no_proxy.entries or upstream.no_proxy.everything:
            route += " (no-proxy exceptions direct)"
    return f"{first}: {route} ({settings.egress_policy().describe()})"


def _describe_authentication(settings: Settings, credentials: Credentials | None) -> str:
    if credentials is None:
        return "off"
    return "required (random credentials)" if settings.random_credentials else "required"
