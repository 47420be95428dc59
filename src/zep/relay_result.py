"""What a relay reports when a pair of sockets is finished (shared by both relay implementations)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass


class RelayEnd(enum.Enum):
    DONE = "done"  # both directions reached EOF and were shut down
    IDLE_TIMEOUT = "idle-timeout"
    CLIENT_ERROR = "client-error"  # reset or other error on the client socket
    UPSTREAM_ERROR = "upstream-error"  # reset or other error on the upstream socket
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class RelayResult:
    bytes_up: int  # bytes written to upstream, early bytes included
    bytes_down: int  # bytes written to the client, early bytes included
    seconds: float
    ended: RelayEnd
    error: str = ""  # errno name or message when ended by an error, e.g. "ECONNRESET"


class RelayCancelled(asyncio.CancelledError):
    """Raised by relay() when it is cancelled: the pair is closed, and the counts so far are kept."""

    def __init__(self, result: RelayResult) -> None:
        super().__init__()
        self.result = result
