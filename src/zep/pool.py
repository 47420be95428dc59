"""`zep serve --workers N`: N identical proxy workers (zep.worker) under zep.supervisor, sharing
the listening ports so that the kernel spreads new connections over them.

The supervisor first reserves each port: a socket bound with SO_REUSEPORT on which it never
listens. That learns the port when 0 was asked for, and holds it while workers come and go,
without taking a share of the connections (see server.bind_socket). Each worker then binds and
listens on that same port with SO_REUSEPORT. The supervisor writes the ready file once every
worker is ready, again each time a restarted worker makes the set complete (its pids change), and
removes it at exit.

Each worker loads every identity on its own: N workers are N sessions with the Ziti controller.

Readiness and metrics for all workers together: with ZEP_ADMIN_ADDRESS the supervisor serves the
one admin listener, with admin_address taken out of the workers' settings (one admin port per
worker would make N scrape targets, and a shared SO_REUSEPORT admin port would answer from a
random worker).
- /healthz and /readyz answer from the supervisor's own state: every worker has reported ready
  on its channel (Worker.ready), none is restarting, no stop signal has come.
- /metrics: the supervisor asks each worker over its channel for its own exposition (a
  {"ask": N, "scrape": true} message answered by {"answer": N, "metrics": text}, a bounded wait per
  worker, zep.workermetrics; one that does not answer in time is left out, zep_worker_scraped 0), adds a `worker` label (bounded: N values) to every
  sample, and merges the families, with its own zep_workers and zep_worker_restarts beside them.
  Chosen over prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR) because the admin
  metrics read gauges and the relay engine's figures from the running process at scrape time
  (custom collectors), which multiprocess mode cannot carry across processes; and because with
  one series per worker a restarted worker's counters start again at 0 as a reset Prometheus
  understands, where a sum over the live workers would seem to go backwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

import zep
from zep import admin, hardening, readyfile
from zep.auth import Credentials, random_credentials
from zep.config import Settings
from zep.readyfile import Ready, ReadyFileError
from zep.server import PORT_SETTINGS, bind_socket, format_address
from zep.supervisor import Supervisor, Worker, WorkerSpec
from zep.worker import encode_settings, worker_environment
from zep.workermetrics import WorkerMetrics

log = logging.getLogger("zep.supervisor")

EXIT_CONFIG = 2
ROLE = "proxy"
# After the stop signal, workers have the drain's timeout (ZEP_DRAIN_TIMEOUT) and this margin to
# exit before SIGKILL.
STOP_MARGIN = 5.0


def serve_with_workers(settings: Settings) -> int:
    def specs(ports: Mapping[str, int], addresses: Mapping[str, str]) -> tuple[list[WorkerSpec], Credentials | None]:
        workers = worker_settings(settings, ports)
        credentials = Credentials(workers.username, workers.password) if workers.auth_required else None
        log.info("zep %s: %d workers sharing %s", zep.__version__, settings.workers,
                 ", ".join(f"{proto} on {address}" for proto, address in addresses.items()))
        scraped = settings.admin_address is not None  # the supervisor serves /metrics for them all
        return [worker_spec(workers, str(n), scraped=scraped) for n in range(1, settings.workers + 1)], credentials

    return supervise(settings, specs)


# What to run, once the ports are reserved: (their numbers, their addresses) -> (the specs, the
# credentials the ready file tells).
SpecsFor = Callable[[Mapping[str, int], Mapping[str, str]], tuple[Sequence[WorkerSpec], Credentials | None]]


def supervise(settings: Settings, specs_for: SpecsFor) -> int:
    """Reserve the ports (and the admin listener's), run the workers `specs_for` gives under the
    supervisor, and keep the ready file (every worker's pid) while they run; zep's exit status."""
    if not settings.dumpable:
        hardening.make_undumpable()  # it holds every worker's settings: passwords, base64 identities
    try:
        if settings.ready_file:
            readyfile.claim(settings.ready_file)
        reserved = reserve_ports(settings)
    except (OSError, ReadyFileError) as exc:
        print(f"zep: error: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        admin_sock = admin.listen_socket(settings.admin_address) if settings.admin_address else None
    except OSError as exc:
        for sock in reserved.values():
            sock.close()
        print(f"zep: error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        addresses = {proto: format_address(sock.getsockname()) for proto, sock in reserved.items()}
        admin_address = format_address(admin_sock.getsockname()) if admin_sock is not None else None
        specs, credentials = specs_for({proto: sock.getsockname()[1] for proto, sock in reserved.items()}, addresses)

        def all_ready(running: Sequence[Worker]) -> None:
            if not settings.ready_file:
                return
            ready = Ready(os.getpid(), addresses.get("socks5"), addresses.get("http"), credentials,
                          settings.no_proxy, admin_address, workers=tuple((w.spec.name, w.pid) for w in running if w.pid is not None))
            try:
                readyfile.write(settings.ready_file, ready)
            except ReadyFileError as exc:
                print(f"zep: error: {exc}", file=sys.stderr, flush=True)
                supervisor.stop(EXIT_CONFIG)

        async def serve_admin(supervisor: Supervisor) -> Callable[[], None]:
            assert admin_sock is not None
            metrics = WorkerMetrics(supervisor)
            server = await admin.start(admin.Admin(metrics, supervisor.why_not_ready, metrics.refresh), admin_sock,
                                       settings.http_request_timeout)
            return server.close

        supervisor = Supervisor(specs, on_all_ready=all_ready, stop_timeout=stop_timeout(settings),
                                service=serve_admin if admin_sock is not None else None)
        try:
            return supervisor.run()
        finally:
            if settings.ready_file:
                readyfile.remove(settings.ready_file, os.getpid())
    finally:
        for sock in reserved.values():
            sock.close()
        if admin_sock is not None:
            admin_sock.close()


def worker_settings(settings: Settings, ports: Mapping[str, int]) -> Settings:
    """What every worker runs with: the reserved ports, no ready file and no admin listener (the
    supervisor has them), and random credentials made once, here, so that every worker accepts the same."""
    changes: dict[str, object] = {"socks_port": ports.get("socks5", settings.socks_port),
                                  "http_port": ports.get("http", settings.http_port), "ready_file": None,
                                  "admin_address": None, "workers": 1}
    if settings.random_credentials:
        made = random_credentials()
        changes.update(username=made.username, password=made.password, random_credentials=False)
    return dataclasses.replace(settings, **changes)


def reserve_ports(settings: Settings) -> dict[str, socket.socket]:
    """A bound, never listening SO_REUSEPORT socket per enabled listener."""
    wanted = {"socks5": (settings.socks_enabled, settings.socks_port),
              "http": (settings.http_enabled, settings.http_port)}
    reserved: dict[str, socket.socket] = {}
    try:
        for proto, (enabled, port) in wanted.items():
            if not enabled:
                continue
            if port != 0:
                # SO_REUSEPORT alone would let us join another zep's workers on this port (same user)
                # and split its traffic: a plain bind first fails if anyone holds the port.
                bind_socket(settings.proxy_host, port, PORT_SETTINGS[proto], listen=False).close()
            reserved[proto] = bind_socket(settings.proxy_host, port, PORT_SETTINGS[proto], reuse_port=True,
                                          listen=False)
    except OSError:
        for sock in reserved.values():
            sock.close()
        raise
    return reserved


def worker_spec(settings: Settings, name: str, *, scraped: bool) -> WorkerSpec:
    """`scraped`: the supervisor serves /metrics, so the worker keeps its metrics for it."""
    return WorkerSpec(name=name, role=ROLE, argv=(sys.executable, "-m", "zep.worker", "--id", name),
                      env=worker_environment(os.environ),
                      hello={"settings": encode_settings(settings), "metrics": scraped})


def stop_timeout(settings: Settings) -> float:
    return settings.drain_timeout + STOP_MARGIN
