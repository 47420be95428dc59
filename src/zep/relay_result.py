"""The relay contract, and what a relay reports when a pair of sockets is finished.

Both implementations are modules that provide `Relay` (below): `start()`, called once per process
before the first pair (the compiled engine opens its descriptors and starts its thread there, so a
relay that cannot run fails at start-up, not on a client's tunnel), `ready()`, and::

    async def relay(client, upstream, *, to_upstream=b"", to_client=b"", idle_timeout) -> RelayResult

`relay()` takes ownership of both connected, non-blocking sockets and closes them when done. The early
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
import socket
from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol


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
    download_finished: bool = False  # the upstream's EOF reached the client: it has the whole download


class RelayCancelled(asyncio.CancelledError):
    """Raised by relay() when it is cancelled: the pair is closed, and the counts so far are kept."""

    def __init__(self, result: RelayResult) -> None:
        super().__init__()
        self.result = result


class RelayUnavailable(RuntimeError):
    """The relay cannot take pairs: `start()` failed (say, out of descriptors) or was not called in
    this process, or the relay was stopped.

    `start()` raises it at start-up, and `relay()` raises it for a pair it cannot run (it still owns
    the sockets: both are closed, the client's with a reset). That is zep's failure, never the
    client's: log it as `Outcome.INTERNAL_ERROR`. And a client must not have been told its tunnel
    is up (SOCKS5 reply 0x00, HTTP 200) for a pair the relay then refuses: callers check `ready()`
    before they send that reply, and answer a general failure (SOCKS5 0x01, HTTP 503) when it is
    False.
    """


class Relay(Protocol):
    """What each relay implementation module provides (`zep._relay`, `zep._relay_py`)."""

    def start(self) -> None:
        """Make the relay ready in this process (idempotent); raises RelayUnavailable if it cannot."""

    def ready(self) -> bool:
        """Whether relay() can take a pair now."""

    async def relay(self, client: socket.socket, upstream: socket.socket, *, to_upstream: bytes = b"",
                    to_client: bytes = b"", idle_timeout: float | None) -> RelayResult:
        """Relay until the pair ends (the contract above); takes ownership of both sockets."""

    def start_pair(self, client: socket.socket, upstream: socket.socket, *, to_upstream: bytes = b"",
                   to_client: bytes = b"", idle_timeout: float | None,
                   done: Callable[[RelayResult], None]) -> PairHandle:
        """relay() without a coroutine, for the fast path: `done` gets the result on this loop when
        the pair ends (cancelled through the handle too: RelayEnd.CANCELLED, the counts so far).
        Raises RelayUnavailable (both sockets closed) for a pair it cannot run."""


class PairHandle(Protocol):
    def cancel(self) -> None:
        """End the pair now; its `done` callback still gets the result."""
