"""How a connection or a forwarded request ended: who ended it, and in which phase.

One vocabulary for the access log, the metrics and the run summary. Each outcome is decided
where the thing happens (the exchange or the driver) and printed as it is, never inferred later.
The two-letter `code` follows HAProxy's termination states: the first letter says who or what
ended it (C client, S server, P proxy, R resource, I internal, K killed; lower case c/s: that
side's timeout), the second the phase (R request, C connect, H response head, D data).
"""

from __future__ import annotations

import enum


class Party(enum.Enum):
    NONE = "-"  # nothing went wrong
    CLIENT = "client"
    SERVER = "server"  # the upstream: a Ziti service or a direct destination
    PROXY = "proxy"  # zep refused or gave up on its own rules, limits or state


class Phase(enum.Enum):
    NONE = "-"
    REQUEST = "request"  # the SOCKS5 handshake or an HTTP request head (and body)
    CONNECT = "connect"  # dialing the destination
    RESPONSE = "response"  # waiting for an upstream's response head (HTTP forwarding)
    DATA = "data"  # bytes flowing: a tunnel, or a forwarded body


class Outcome(enum.Enum):
    """`value` is (the name printed in logs and metric labels, the termination code)."""

    OK = ("ok", "--")

    CLIENT_CLOSED = ("client-closed", "CR")  # the client left before its request was complete
    REQUEST_TIMEOUT = ("request-timeout", "cR")  # the http-request timeout ran out
    BAD_REQUEST = ("bad-request", "PR")  # malformed, unsupported or wrong protocol
    AUTH_FAILED = ("auth-failed", "PR")
    REFUSED = ("refused", "RR")  # over maxconn, or draining

    DENIED = ("denied", "PC")  # policy does not allow the destination
    DIAL_FAILED = ("dial-failed", "SC")
    DIAL_TIMEOUT = ("dial-timeout", "sC")  # the connect timeout ran out
    ZITI_DIAL_FAILED = ("ziti-dial-failed", "SD")  # the overlay dial failed after the SDK's bridge accepted

    RESPONSE_FAILED = ("upstream-error", "SH")  # the upstream closed, broke or spoke nonsense before its head
    RESPONSE_TIMEOUT = ("server-timeout", "sH")  # the server timeout ran out waiting for the head

    CLIENT_ERROR = ("client-error", "CD")  # the client reset or broke the connection mid-transfer
    CLIENT_TIMEOUT = ("client-timeout", "cD")  # the client went silent (mid-body, or stopped reading)
    UPSTREAM_ERROR = ("upstream-error", "SD")  # the upstream reset or broke mid-transfer
    SERVER_TIMEOUT = ("server-timeout", "sD")  # the upstream went silent mid-body
    TUNNEL_TIMEOUT = ("tunnel-timeout", "cD")  # no byte either way within the tunnel timeout

    CANCELLED = ("cancelled", "KD")  # zep stopped (shutdown, or the drain timeout ran out)
    INTERNAL_ERROR = ("internal-error", "ID")  # a bug or a resource zep itself lacks (see the log)

    def __init__(self, label: str, code: str) -> None:
        self.label = label
        self.code = code

    @property
    def by(self) -> Party:
        return _PARTIES[self.code[0].upper()]

    @property
    def phase(self) -> Phase:
        return _PHASES[self.code[1]]

    @property
    def timed_out(self) -> bool:
        return self.code[0] in "cs"

    def __str__(self) -> str:
        return self.label


_PARTIES = {"-": Party.NONE, "C": Party.CLIENT, "S": Party.SERVER, "P": Party.PROXY, "R": Party.PROXY,
            "I": Party.PROXY, "K": Party.PROXY}
_PHASES = {"-": Phase.NONE, "R": Phase.REQUEST, "C": Phase.CONNECT, "H": Phase.RESPONSE, "D": Phase.DATA}
