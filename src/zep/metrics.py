"""Prometheus metrics, in a registry of zep's own (nothing in prometheus_client's global one).

Counters are fed by an access-log observer: each finished exchange adds its outcome, bytes and dial
time, so bytes of a tunnel count when it ends. Gauges and the relay engine's figures are read from
the running process when scraped. No label carries a destination host or a user name: routes are
counted by kind, Ziti services by name (names only a successful dial has confirmed, and at most
MAX_SERVICES of them), handshake failures by their outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zep.accesslog import AccessEntry
from zep.outcome import Phase
from zep.relay_result import RelayUnavailable
from zep.throttle import LoginThrottle

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
DIAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
MAX_SERVICES = 256  # Ziti service label values; any further service counts as "other"

# The exposition is for scraping: `*_created` series would double it for no use here.
prometheus_client.disable_created_metrics()


class ServerView(Protocol):
    """What the scrape reads from the proxy server (zep.server.ProxyServer)."""

    @property
    def open_connections(self) -> int: ...

    def accepted_by_listener(self) -> Mapping[str, int]: ...

    def tunnels_open(self) -> int: ...


RelayStats = Callable[[], Mapping[str, int]]

# The compiled engine's stats() keys: (metric, help, gauge or counter).
_ENGINE_FIGURES = {
    "active": ("zep_relay_pairs_running", "Pairs the relay engine is moving bytes for", False),
    "pairs": ("zep_relay_pairs", "Pairs handed to the relay engine", True),
    "pipes_in_use": ("zep_relay_pipes_in_use", "Splice pipes holding bytes in flight", False),
    "pipes_pooled": ("zep_relay_pipes_pooled", "Empty splice pipes kept for reuse", False),
    "pipes_created": ("zep_relay_pipes_created", "Splice pipes created", True),
    "splice_bytes": ("zep_relay_splice_bytes", "Bytes moved with splice", True),
    "copy_bytes": ("zep_relay_copy_bytes", "Bytes moved with recv/send", True),
    "copy_directions": ("zep_relay_splice_fallbacks",
                        "Directions that fell back to recv/send (splice refused, or no pipe to be had)", True),
    "socks_native": ("zep_relay_socks_handshakes", "SOCKS5 handshakes the relay engine took from accept", True),
    "socks_relayed": ("zep_relay_socks_tunnels", "Of those, the ones the engine dialed and relayed itself", True),
    "socks_given_back": ("zep_relay_socks_given_back",
                         "Of those, the ones given back to Python (off the engine's path)", True),
}
_MODE_SWITCHES = {"small_to_splice": "splice", "splice_to_small": "copy"}


class Metrics:
    def __init__(self, *, version: str, relay: str, relay_stats: RelayStats | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.server: ServerView | None = None  # set once the listeners are open
        self.logins: LoginThrottle | None = None
        self.identities_loaded = 0
        self.max_connections = 0
        self.relay_stats = relay_stats
        self._build_labels = {"version": version, "relay": relay, "sdk": "none"}
        self._services: set[str] = set()
        registry = self.registry
        self.build = Info("zep_build", "Version, relay implementation and OpenZiti C SDK version", registry=registry)
        self.build.info(self._build_labels)
        self.exchanges = Counter(
            "zep_exchanges", "Finished exchanges (tunnels, forwarded requests, refused connections) by listener, "
            "route kind and outcome", ["proto", "route_kind", "outcome"], registry=registry)
        self.ziti_exchanges = Counter(
            "zep_ziti_exchanges", "Finished exchanges through Ziti by service ('intercept': matched by intercept "
            "address, the SDK does not say which service) and outcome", ["service", "outcome"], registry=registry)
        self.handshake_failures = Counter(
            "zep_handshake_failures", "SOCKS5 handshakes and HTTP request heads that did not lead to a dial, by "
            "outcome (auth-failed, bad-request, request-timeout, client-closed, refused)", ["proto", "reason"],
            registry=registry)
        self.bytes = Counter("zep_bytes", "Bytes relayed, counted when the exchange ends; up: to the upstream",
                             ["direction", "route_kind"], registry=registry)
        self.dial_seconds = Histogram("zep_dial_seconds", "Time to connect to the destination, failed dials included",
                                      ["route_kind"], buckets=DIAL_BUCKETS, registry=registry)
        registry.register(_Live(self))

    def set_sdk_version(self, version: str) -> None:
        self._build_labels["sdk"] = version
        self.build.info(self._build_labels)

    def observe(self, entry: AccessEntry) -> None:
        """The access-log observer (accesslog.subscribe)."""
        kind = entry.route_kind
        outcome = entry.outcome.label
        self.exchanges.labels(entry.proto, kind, outcome).inc()
        if kind == "ziti":
            self.ziti_exchanges.labels(self._service_label(entry.route), outcome).inc()
        if entry.outcome.phase is Phase.REQUEST:
            self.handshake_failures.labels(entry.proto, outcome).inc()
        if entry.up:
            self.bytes.labels("up", kind).inc(entry.up)
        if entry.down:
            self.bytes.labels("down", kind).inc(entry.down)
        if entry.dial_seconds:
            self.dial_seconds.labels(kind).observe(entry.dial_seconds)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def _service_label(self, route: str) -> str:
        service = route.partition(":")[2] or "intercept"
        if service not in self._services:
            if len(self._services) >= MAX_SERVICES:
                return "other"
            self._services.add(service)
        return service


class _Live:
    """Figures read at scrape time from the server, the login throttle and the relay engine."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # the families depend on what is running; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.m
        server = m.server
        yield _gauge("zep_connections_active", "Client connections open now", server.open_connections if server else 0)
        yield _gauge("zep_tunnels_active", "Tunnels (SOCKS5 and CONNECT) relaying now", server.tunnels_open() if server else 0)
        accepted = CounterMetricFamily("zep_connections_accepted", "Client connections accepted, by listener",
                                       labels=["proto"])
        for proto, count in (server.accepted_by_listener() if server else {}).items():
            accepted.add_metric([proto], count)
        yield accepted
        yield _gauge("zep_max_connections", "The connection limit in force (maxconn)", m.max_connections)
        yield _gauge("zep_ziti_identities_loaded", "Ziti identities loaded", m.identities_loaded)
        if m.logins is not None:
            yield CounterMetricFamily("zep_login_failures", "Wrong credentials, every attempt",
                                      value=m.logins.failures_total)
            yield CounterMetricFamily("zep_logins_delayed", "Login answers held back because their source kept "
                                      "failing", value=m.logins.delayed_total)
            yield _gauge("zep_login_sources_throttled", "Failing source addresses remembered", len(m.logins))
        yield from self._engine()

    def _engine(self) -> Iterator[Metric]:
        if self.m.relay_stats is None:
            return  # the pure-Python relay keeps no figures of its own
        try:
            stats = self.m.relay_stats()
        except RelayUnavailable:  # the engine is not running in this process: no figures
            return
        for key, (name, help_text, is_counter) in _ENGINE_FIGURES.items():
            if key in stats:
                yield (CounterMetricFamily(name, help_text, value=stats[key]) if is_counter
                       else _gauge(name, help_text, stats[key]))
        switches = CounterMetricFamily("zep_relay_mode_switches", "Directions switched between splice and "
                                       "recv/send by their message sizes, by the mode switched to", labels=["to"])
        for key, mode in _MODE_SWITCHES.items():
            if key in stats:
                switches.add_metric([mode], stats[key])
        yield switches


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)
