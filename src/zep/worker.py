"""A worker process of `zep serve --workers N`, started by zep.pool under zep.supervisor.

It reads its settings from its control channel (never from its command line or its environment,
which other users may read or which it passes on), serves the listeners like a stand-alone
`zep serve` but with SO_REUSEPORT on the ports the supervisor reserved, tells the supervisor when
it is ready or why it cannot start, and stops when the supervisor goes away. It loads every
configured identity itself: each worker has its own session with the Ziti controller.

Run as `python -m zep.worker --id ID --channel-fd N`; nothing else should start it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from zep.config import ENVIRONMENT, Settings
from zep.readyfile import Ready
from zep.serving import Connections
from zep.supervisor import MAX_MESSAGE, receive

if TYPE_CHECKING:
    from zep.metrics import Metrics

log = logging.getLogger("zep.worker")

HELLO_TIMEOUT = 10.0  # for the settings, which the supervisor sent before starting us


def encode_settings(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def decode_settings(values: Mapping[str, Any]) -> Settings:
    """The inverse of encode_settings (JSON turned the tuples into lists)."""
    return Settings(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The supervisor's environment without the settings' variables: the settings (the proxy
    password and a base64 identity among them) reach a worker only over its channel."""
    settings_variables = set(ENVIRONMENT.values())
    return {name: value for name, value in environ.items() if name not in settings_variables}


class WorkerRole:
    """run_proxy's role in a worker: shared ports; readiness and errors go to the supervisor, which
    also asks for the metrics (`{"ask": N, "scrape": true}`, answered by `{"answer": N, "metrics": TEXT}`)."""

    reuse_port = True

    def __init__(self, channel: socket.socket, scraped: bool) -> None:
        self.channel = channel
        self.scraped = scraped  # the supervisor serves /metrics (without it, counting would be wasted)
        self.metrics: Metrics | None = None

    def share_metrics(self, metrics: Metrics) -> bool:
        self.metrics = metrics
        return self.scraped

    def ready(self, ready: Ready) -> None:
        self._send({"ready": {"pid": ready.pid, "socks5": ready.socks5, "http": ready.http}})

    def fail(self, message: str) -> None:
        if not self._send({"error": message}):  # no supervisor to say it: say it ourselves
            print(f"zep: error: {message}", file=sys.stderr)

    def watch(self, stop: Callable[[], None]) -> None:
        """The channel's end of file means the supervisor is gone: stop as if told to."""
        loop = asyncio.get_running_loop()
        fd = self.channel.fileno()

        def readable() -> None:
            data = receive(self.channel)
            if data == b"":
                loop.remove_reader(fd)
                log.warning("the supervisor is gone: stopping")
                stop()
            elif data:
                self._answer(data)

        loop.add_reader(fd, readable)

    def _answer(self, data: bytes) -> None:
        try:
            question = json.loads(data)
        except ValueError:
            question = None
        if not isinstance(question, dict) or "ask" not in question:
            log.warning("a message from the supervisor that is not a question; ignored")
            return
        answer: dict[str, Any] = {"answer": question["ask"]}
        if question.get("scrape") and self.scraped and self.metrics is not None:
            answer["metrics"] = self.metrics.exposition().decode()
        self._send(answer)

    def _send(self, message: dict[str, Any]) -> bool:
        try:
            self.channel.send(json.dumps(message).encode())
        except OSError:
            return False
        return True


def main(argv: Sequence[str] | None = None) -> int:
    from zep.cli import configure_logging
    from zep.serving import run_proxy

    parser = argparse.ArgumentParser(prog="zep.worker", description="a worker process of zep serve --workers")
    parser.add_argument("--id", required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.channel_fd)
    channel.settimeout(HELLO_TIMEOUT)
    try:
        hello = json.loads(channel.recv(MAX_MESSAGE))
        settings = decode_settings(hello["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"zep worker {args.id}: no settings from the supervisor ({exc})", file=sys.stderr)
        return 1
    channel.settimeout(None)
    configure_logging(settings.log_level, settings.log_format, args.id)
    return run_proxy(settings, role=WorkerRole(channel, scraped=bool(hello.get("metrics"))),
                     connections=connections(hello))


def connections(hello: Mapping[str, Any]) -> Connections | None:
    """Where this worker's connections come from, by its role: its own listeners (None: a worker of
    `--workers N`), or, serving tenants, the front's listeners or a tenant's hand-off socket."""
    role = hello.get("role", "proxy")
    if role == "front":
        from zep.front import FrontListeners
        from zep.tenancy import decode_tenant

        tenants = [decode_tenant(values) for values in hello["tenants"]]
        return FrontListeners(tenants, {values["name"]: values["socket"] for values in hello["tenants"]})
    if role == "tenant":
        from zep.tenancy import decode_tenant
        from zep.tenant_worker import TenantHandoffs

        return TenantHandoffs(decode_tenant(hello["tenant"]), hello["socket"])
    return None


if __name__ == "__main__":
    raise SystemExit(main())
