"""`zep serve` with a tenants file (ZEP_TENANTS): one front and one worker per tenant, under the
same supervisor as `--workers N` (zep.supervisor).

- The front (role "front", zep.front) binds the listeners, negotiates and authenticates for every
  tenant, and hands each connection to its tenant's worker. It never loads an identity.
- Each tenant's worker (role "tenant", zep.tenant_worker) loads that tenant's identities only,
  routes with that tenant's fallback and egress rules, and takes hand-offs on its own Unix
  socket in a directory this process makes, mode 0700, and removes at exit.

As with `--workers`, the ports are reserved here first (so a restarted front gets the same ones),
settings and secrets reach each process over its channel only, and the ready file is written once
every process is ready. A tenant's base64 identity (`identity_env`) is taken out of the environment
every process inherits and sent to that tenant's worker alone, in its hello.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import zep
from zep import pool
from zep.config import ConfigError, Settings
from zep.pool import EXIT_CONFIG
from zep.supervisor import WorkerSpec
from zep.tenants import FRONT, Tenant, Tenants, front_settings, load_tenants
from zep.worker import encode_settings, worker_environment

log = logging.getLogger("zep.supervisor")


def tenant_hello(tenant: Tenant) -> dict[str, Any]:
    return {"name": tenant.name, "username": tenant.username, "password_hash": tenant.password_hash}


def decode_tenant(values: Mapping[str, Any]) -> Tenant:
    return Tenant(values["name"], values["username"], values["password_hash"])


def serve_tenants(settings: Settings, environ: Mapping[str, str] = os.environ) -> int:
    assert settings.tenants
    try:
        tenants = load_tenants(settings.tenants, environ)
        workers = {t.name: t.worker_settings(settings, environ) for t in tenants.tenants}
    except ConfigError as exc:
        print(f"zep: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    directory = tempfile.mkdtemp(prefix="zep-tenants-")  # mode 0700: only zep's user reaches the sockets
    sockets = {t.name: os.path.join(directory, f"{t.name}.sock") for t in tenants.tenants}
    env = child_environment(environ, tenants)

    def specs(ports: Mapping[str, int], addresses: Mapping[str, str]) -> tuple[list[WorkerSpec], None]:
        front = pool.worker_settings(front_settings(settings), ports)
        own = {name: pool.worker_settings(values, ports) for name, values in workers.items()}  # no admin listener
        log.info("zep %s: a front on %s and a worker for each of %d tenants (%s)", zep.__version__,
                 ", ".join(f"{proto} {address}" for proto, address in addresses.items()), len(tenants.tenants),
                 ", ".join(t.name for t in tenants.tenants))
        scraped = settings.admin_address is not None  # the supervisor serves /metrics for them all
        return [spec(FRONT, "front", env, {"settings": encode_settings(front), "metrics": scraped, "tenants": [
                    {**tenant_hello(t), "socket": sockets[t.name]} for t in tenants.tenants]}),
                *(spec(t.name, "tenant", env, {"settings": encode_settings(own[t.name]), "metrics": scraped,
                                               "tenant": tenant_hello(t), "socket": sockets[t.name]})
                  for t in tenants.tenants)], None

    try:
        return pool.supervise(settings, specs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def spec(name: str, role: str, env: Mapping[str, str], hello: dict[str, Any]) -> WorkerSpec:
    return WorkerSpec(name=name, role=role, argv=(sys.executable, "-m", "zep.worker", "--id", name), env=env,
                      hello={"role": role, **hello})


def child_environment(environ: Mapping[str, str], tenants: Tenants) -> dict[str, str]:
    """What every process inherits: no settings' variables, and no tenant's identity variable."""
    secret = {t.identity_env for t in tenants.tenants if t.identity_env}
    return {name: value for name, value in worker_environment(environ).items() if name not in secret}
