"""One access-log line per client connection, written when it closes (logfmt, logger `zep.access`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from zep.dial import Failure
from zep.relay_result import RelayEnd, RelayResult

access_logger = logging.getLogger("zep.access")

# How a relay's end reads in the access log. A Ziti route whose upstream fails before it sent a
# single byte is the overlay dial failing after the SDK's bridge accepted us (see ziti.py).
_RELAY_OUTCOMES = {
    RelayEnd.DONE: "ok",
    RelayEnd.IDLE_TIMEOUT: "idle-timeout",
    RelayEnd.CLIENT_ERROR: "client-error",
    RelayEnd.UPSTREAM_ERROR: "upstream-error",
    RelayEnd.CANCELLED: "cancelled",
}


def relay_outcome(route: str, result: RelayResult) -> str:
    if route.startswith("ziti:") and result.ended is RelayEnd.UPSTREAM_ERROR and result.bytes_down == 0:
        return "ziti-dial-failed"
    return _RELAY_OUTCOMES[result.ended]


@dataclass
class AccessRecord:
    client: str
    proto: str
    target: str = "-"
    route: str = "-"
    user: str = "-"
    up: int = 0
    down: int = 0
    outcome: str = "client-error"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)

    def add_relay(self, route: str, result: RelayResult) -> None:
        self.up += result.bytes_up
        self.down += result.bytes_down
        self.outcome = relay_outcome(route, result)
        if result.error:
            self.detail = result.error

    def add_dial_failure(self, failure: Failure, detail: str) -> None:
        self.outcome = _dial_outcome(failure)
        self.detail = detail
        if failure is Failure.NOT_ALLOWED:
            self.route = "deny"

    def emit(self) -> None:
        seconds = time.monotonic() - self.started
        line = (
            f"client={self.client} proto={self.proto} target={self.target} route={self.route} "
            f"user={self.user} up={self.up} down={self.down} secs={seconds:.3f} outcome={self.outcome}"
        )
        if self.detail:
            line += f' detail="{_quote(self.detail)}"'
        access_logger.info(line)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _dial_outcome(failure: Failure) -> str:
    if failure is Failure.NOT_ALLOWED:
        return "denied"
    if failure is Failure.TIMEOUT:
        return "dial-timeout"
    return "dial-failed"
