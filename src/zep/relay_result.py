"""The relay contract, and what a relay reports when a pair of sockets is finished.

Both implementations provide::

    async def relay(client, upstream, *, to_upstream=b"", to_client=b"", idle_timeout) -> RelayResult

It takes ownership of both connected, non-blocking sockets and closes them when done. The early
bytes are delivered first. EOF on one side becomes shutdown(SHUT_WR) on the other; the pair ends
when both directions are finished, when either side fails, or after `idle_timeout` seconds with no
bytes either way. Only a pair whose two directions finished is closed with FINs; however else it
ends (an error on either side, the idle timeout, cancellation) both sockets are reset (SO_LINGER
0), so a peer reading to EOF never takes a cut transfer for a complete one. A side is never read
faster than the other can take, so memory per pair stays small. Cancelled, it closes the pair at
once and raises `RelayCancelled` carrying the counts so far.
"""

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
