"""What an exchange and its driver say to each other: events in, commands out.

An exchange (`socks_exchange`, `http_exchange`) is the logic of one client connection, sans-IO in
the manner of h11 and mitmproxy's commands: it never touches a socket and never reads a clock.
`start()` and `handle(event)` return the commands the driver (`zep.driver`, the only code that
awaits) carries out, in order. Between calls, `wants_client` / `wants_upstream` say which sides the
exchange wants to read; the driver reads a side only while the exchange wants it and while a named
timer bounds the wait (see `TIMERS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from zep.dial import Failure
from zep.outcome import Outcome

# The named timeouts (HAProxy's names). The first four are timers an exchange arms; `tunnel` is
# the relay's idle timeout, applied by the driver; `connect` bounds every Dial (the router's).
HTTP_REQUEST = "http-request"  # the whole request head (HTTP) or the SOCKS5 handshake
HTTP_KEEP_ALIVE = "http-keep-alive"  # idle between two requests on a kept-alive connection
CLIENT = "client"  # client inactivity while zep waits for it (mid-body, or it stopped reading)
SERVER = "server"  # upstream inactivity while zep waits for it (a response, or it stopped reading)
TUNNEL = "tunnel"

# Timer name -> (the side whose traffic it watches, True when any progress on that side restarts it).
# http-request and http-keep-alive are deadlines from the moment they are armed.
TIMERS = {
    HTTP_REQUEST: ("client", False),
    HTTP_KEEP_ALIVE: ("client", False),
    CLIENT: ("client", True),
    SERVER: ("upstream", True),
}


# ----------------------------------------------------------------------------- events (driver -> exchange)

@dataclass(frozen=True, slots=True)
class ClientData:
    data: bytes


@dataclass(frozen=True, slots=True)
class ClientEof:
    pass


@dataclass(frozen=True, slots=True)
class ClientError:
    reason: str  # errno name, e.g. "ECONNRESET"


@dataclass(frozen=True, slots=True)
class UpstreamData:
    data: bytes


@dataclass(frozen=True, slots=True)
class UpstreamEof:
    pass


@dataclass(frozen=True, slots=True)
class UpstreamError:
    reason: str
    sending: bool = False  # True: a send failed (what the upstream already sent may still be read)


@dataclass(frozen=True, slots=True)
class Dialed:
    route: str
    bound: tuple | None  # the upstream socket's local address, when the OS could say


@dataclass(frozen=True, slots=True)
class DialFailed:
    failure: Failure
    detail: str


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str


@dataclass(frozen=True, slots=True)
class Drain:
    """zep is draining: finish what is in flight, take no further request."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """zep stops now (shutdown, or the drain timeout ran out): the exchange answers with the Log of
    what it had in hand, if anything; no other command is carried out."""


Event = (ClientData | ClientEof | ClientError | UpstreamData | UpstreamEof | UpstreamError | Dialed | DialFailed
         | TimerFired | Drain | Cancel)


# ----------------------------------------------------------------------------- commands (exchange -> driver)

@dataclass(frozen=True, slots=True)
class SendClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to (host, port) through the router, within the connect timeout; answered by
    Dialed or DialFailed. Replaces any upstream connection the driver holds, unless `reuse` and
    that one goes to the same (host, port) and is still open (the upstream has not closed it)."""

    host: str
    port: int
    reuse: bool = False


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close the upstream connection (it cannot carry another request)."""


@dataclass(frozen=True, slots=True)
class Arm:
    """Start (or restart) the named timer; TimerFired(name) when it runs out."""

    name: str


@dataclass(frozen=True, slots=True)
class Disarm:
    name: str


@dataclass(frozen=True, slots=True)
class Report:
    """The exchange's part of an access entry; the driver adds client, bytes and duration."""

    outcome: Outcome
    target: str = "-"
    route: str = "-"
    user: str = "-"
    detail: str = ""
    method: str = ""
    path: str = ""
    status: int = 0


@dataclass(frozen=True, slots=True)
class Log:
    """One access entry for what happened since the previous one (bytes and time included).

    Written once every byte queued for the client has been sent; if the client fails first, the
    entry says so instead."""

    report: Report


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Tell the client its tunnel is up (`reply`), then relay both sockets until the tunnel ends
    (the driver decides and logs its outcome); `early` goes upstream first. If the relay cannot
    take a pair, the client gets `refusal` instead and the entry says internal-error. Always the
    last command."""

    reply: bytes
    refusal: bytes
    early: bytes
    report: Report  # outcome is decided by the driver from the relay's result


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued for the client, then close. `linger`: the client may still be sending
    (a request zep did not read to its end), so shut down writing and discard what it sends
    until it closes, within the client timeout, for the answer not to be lost to a reset.
    `abort`: reset the connection instead (the client must not take a cut response for whole)."""

    linger: bool = False
    abort: bool = False


@dataclass(frozen=True, slots=True)
class Login:
    """The outcome of a password check, right before its answer: the driver holds the commands
    after it while the client's address keeps failing, and tells the throttle (zep.throttle)."""

    accepted: bool


Command = SendClient | SendUpstream | Dial | CloseUpstream | Arm | Disarm | Log | Login | Tunnel | Close


class Exchange(Protocol):
    wants_client: bool
    wants_upstream: bool

    def start(self) -> list[Command]:
        ...

    def handle(self, event: Event) -> list[Command]:
        ...


def authority(host: str, port: int) -> str:
    """host:port as access lines show it, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

