"""Access log: one entry per tunnel and per forwarded HTTP request (logger `zep.access`).

An `AccessEntry` is the finished, immutable account of one exchange. `emit()` hands it to every
observer (metrics, the `zep run` summary) and then writes it as one logfmt line, or one JSON line
with `configure(json_lines=True)`. Entries never carry credentials, identity contents or query
strings; `user` is only ever a configured user name (else `?`).

`AccessRecord` is the mutable builder the driver fills in as things happen (zep.driver); the
outcome it prints is decided where the exchange ended, never inferred here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from zep.dial import Failure
from zep.outcome import Outcome

access_logger = logging.getLogger("zep.access")

Observer = Callable[["AccessEntry"], None]
LineFold = Callable[["AccessEntry"], bool]
_observers: list[Observer] = []
_fold: LineFold | None = None
_json_lines = False
# Writes one finished access line where zep's log goes (see configure); None: through `logging`.
LineWriter = Callable[[str], None]
_writer: LineWriter | None = None


class AccessEntry(NamedTuple):
    """Immutable; a named tuple rather than a frozen dataclass, which takes three times as long to
    make (one entry per exchange)."""

    client: str  # "127.0.0.1:51234"
    proto: str  # the listener: "socks5" or "http"
    target: str  # "host:port" for a tunnel, "http://host:port" for a forwarded request, "-" if none
    route: str  # "direct", "proxy" (the upstream proxy), "ziti:intercept", "ziti:<service>", "deny" or "-"
    user: str  # a configured user name, "-" (no authentication) or "?" (not a configured user)
    up: int  # bytes sent to the upstream
    down: int  # bytes sent to the client
    seconds: float
    outcome: Outcome
    detail: str = ""
    method: str = ""  # HTTP: "CONNECT", "GET", ...; empty for SOCKS5
    path: str = ""  # forwarded requests: the path, without the query string
    status: int = 0  # HTTP: the status sent to the client; 0 when none was
    tenant: str = ""
    count: int = 0  # an aggregated line: how many exchanges it stands for (see throttle.py); 0: one, not aggregated
    dial_seconds: float = 0.0  # time spent dialing the destination (failed dials too); 0: no dial

    @property
    def route_kind(self) -> str:
        """A bounded label for metrics: "ziti", "direct", "proxy", "deny" or "-"."""
        return self.route.partition(":")[0]

    def fields(self) -> dict[str, object]:
        """The entry in log order, optional fields only when they say something."""
        out: dict[str, object] = {"client": self.client, "proto": self.proto}
        if self.tenant:
            out["tenant"] = self.tenant
        if self.method:
            out["method"] = self.method
        out["target"] = self.target
        if self.path:
            out["path"] = self.path
        if self.status:
            out["status"] = self.status
        out.update(route=self.route, user=self.user, up=self.up, down=self.down,
                   secs=round(self.seconds, 3), outcome=self.outcome.label, term=self.outcome.code)
        if self.count:
            out["count"] = self.count
        if self.detail:
            out["detail"] = self.detail
        return out


def subscribe(observer: Observer) -> None:
    _observers.append(observer)


def unsubscribe(observer: Observer) -> None:
    _observers.remove(observer)


def configure(*, json_lines: bool, writer: LineWriter | None = None) -> None:
    """`writer`: the one place access lines go, instead of a logging record each (zep's own
    command line sets it up: it owns the log's handler and its format)."""
    global _json_lines, _writer
    _json_lines, _writer = json_lines, writer


def fold_lines(fold: LineFold | None) -> None:
    """Let `fold` keep entries out of the log (it returns True for those); observers still see them."""
    global _fold
    _fold = fold


def emit(entry: AccessEntry) -> None:
    for observer in _observers:
        observer(entry)
    if _fold is None or not _fold(entry):
        write(entry)


def write(entry: AccessEntry) -> None:
    """The log line alone: for aggregated entries, whose exchanges the observers have seen.

    It goes to the writer zep's command line set up (see configure), else to the handlers in one
    call, a record made here: Logger.info's caller lookup and the rest of its work per record
    cost more than the line itself (one per connection)."""
    if access_logger.isEnabledFor(logging.INFO):
        line = format_json(entry) if _json_lines else format_logfmt(entry)
        if _writer is not None:
            _writer(line)
        else:
            access_logger.handle(access_logger.makeRecord(access_logger.name, logging.INFO, __file__, 0, line, None,
                                                          None))


def format_logfmt(entry: AccessEntry) -> str:
    parts = []
    for name, value in entry.fields().items():
        if name == "secs":
            value = f"{value:.3f}"
        elif type(value) is str and (name == "detail" or not value or _NEEDS_QUOTES.search(value)):
            value = f'"{_quote(value)}"'
        parts.append(f"{name}={value}")
    return " ".join(parts)


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def format_json(entry: AccessEntry) -> str:
    return json.dumps(entry.fields(), separators=(",", ":"))


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def dial_outcome(failure: Failure) -> Outcome:
    if failure is Failure.NOT_ALLOWED:
        return Outcome.DENIED
    if failure is Failure.TIMEOUT:
        return Outcome.DIAL_TIMEOUT
    return Outcome.DIAL_FAILED


@dataclass(slots=True)
class AccessRecord:
    """What is known so far about one exchange; `emit()` turns it into an AccessEntry."""

    client: str
    proto: str
    target: str = "-"
    route: str = "-"
    user: str = "-"
    up: int = 0
    down: int = 0
    outcome: Outcome = Outcome.INTERNAL_ERROR  # until whoever ends the exchange decides it
    detail: str = ""
    method: str = ""
    path: str = ""
    status: int = 0
    tenant: str = ""
    dial_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def timing_dial(self) -> Iterator[None]:
        """Around a dial: its time (success or failure) adds to dial_seconds."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.dial_seconds += time.monotonic() - started

    def entry(self) -> AccessEntry:
        return AccessEntry(
            client=self.client, proto=self.proto, target=self.target, route=self.route, user=self.user,
            up=self.up, down=self.down, seconds=time.monotonic() - self.started, outcome=self.outcome,
            detail=self.detail, method=self.method, path=self.path, status=self.status, tenant=self.tenant,
            dial_seconds=self.dial_seconds,
        )

    def emit(self) -> None:
        emit(self.entry())
