"""Dialers: turn (host, port) into a connected upstream socket, or a typed failure.

A dialer knows nothing of clients or protocols. It returns an `Upstream` (a connected,
non-blocking socket plus the route label the access log shows), returns None when the
destination is not one it serves, or raises `DialError` carrying both the SOCKS5 reply
code and the HTTP status the failure maps to.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Protocol

from zep.egress import EgressPolicy, parse_address


class Failure(enum.Enum):
    """Why a dial failed: (SOCKS5 reply code, HTTP status)."""

    GENERAL = (0x01, 502)
    NOT_ALLOWED = (0x02, 403)
    NETWORK_UNREACHABLE = (0x03, 502)
    HOST_UNREACHABLE = (0x04, 502)
    REFUSED = (0x05, 502)
    TIMEOUT = (0x06, 504)
    UNAVAILABLE = (0x01, 503)  # zep cannot carry it now: the tenant's worker is down or restarting

    def __init__(self, socks_reply: int, http_status: int) -> None:
        self.socks_reply = socks_reply
        self.http_status = http_status


class DialError(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


@dataclass(frozen=True)
class Upstream:
    sock: socket.socket  # connected and non-blocking; whoever receives it owns it
    route: str  # "direct", "proxy" or "ziti:<service>"
    # Bytes from the destination that arrived with the upstream proxy's answer: the client gets
    # them first (the relay's `to_client`), before anything read from `sock`.
    early_down: bytes = b""


class Dialer(Protocol):
    async def dial(self, host: str, port: int, timeout: float) -> Upstream | None:
        """Connect to (host, port); None when this dialer has no route there."""
        ...


_ERRNO_FAILURES = {
    errno.ECONNREFUSED: Failure.REFUSED,
    errno.ENETUNREACH: Failure.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Failure.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Failure.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: Failure.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Failure.TIMEOUT,
}


def failure_for_os_error(exc: OSError) -> Failure:
    return _ERRNO_FAILURES.get(exc.errno or 0, Failure.GENERAL)


class DirectDialer:
    """Dials the destination itself: async DNS through the loop, happy eyeballs (RFC 8305).

    With an egress policy, a destination the name alone denies is refused before any DNS query,
    and every resolved address is checked before the connect: only the addresses that were
    checked and allowed are dialed (no second resolution that DNS rebinding could change).
    """

    HAPPY_EYEBALLS_DELAY = 0.25
    VERDICTS_KEPT = 4096  # (host, port) pairs whose literal_addresses() answer is remembered

    def __init__(self, policy: EgressPolicy | None = None) -> None:
        self.policy = policy
        # The answer for a destination depends on it and the policy alone, and a pipeline asks
        # about the same few again and again: parsing and checking them is a per-connection cost.
        self._verdicts: dict[tuple[str, int], list[tuple[int, tuple]] | DialError | None] = {}

    async def dial(self, host: str, port: int, timeout: float) -> Upstream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                addresses = self.literal_addresses(host, port)
                if addresses is None:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    addresses = _interleave_families(infos)
                    if self.policy is not None:
                        addresses = _allowed_addresses(self.policy, host, port, addresses)
                sock = await _connect_happy_eyeballs(addresses, self.HAPPY_EYEBALLS_DELAY)
        except TimeoutError:
            raise connect_timed_out(host, port, timeout) from None
        except socket.gaierror as exc:
            raise DialError(Failure.HOST_UNREACHABLE, f"cannot resolve {host}: {exc.strerror}") from None
        except UnicodeError:
            raise DialError(Failure.HOST_UNREACHABLE, f"cannot resolve {host}: not a valid host name") from None
        except OSError as exc:
            raise connect_failed(exc, host, port) from None
        return Upstream(sock, "direct")

    def literal_addresses(self, host: str, port: int) -> list[tuple[int, tuple]] | None:
        """The addresses to dial for an IP literal (no resolver needed), None for a name; raises
        DialError when the policy refuses the destination (a name: before any DNS query). The
        list returned is shared: not to be changed."""
        key = (host, port)
        try:
            verdict = self._verdicts[key]
        except KeyError:
            verdict = self._verdicts[key] = self._literal_verdict(host, port)
            if len(self._verdicts) > self.VERDICTS_KEPT:
                del self._verdicts[next(iter(self._verdicts))]  # the oldest
        if type(verdict) is DialError:
            raise DialError(verdict.failure, verdict.detail)
        return verdict

    def _literal_verdict(self, host: str, port: int) -> list[tuple[int, tuple]] | DialError | None:
        try:
            if self.policy is not None and (verdict := self.policy.refuse_early(host, port)) is not None:
                raise DialError(Failure.NOT_ALLOWED, verdict.reason)
            addresses = _literal_address(host, port)
            if addresses is not None and self.policy is not None:
                addresses = _allowed_addresses(self.policy, host, port, addresses)
        except DialError as exc:
            return exc
        return addresses


def connect_timed_out(host: str, port: int, timeout: float) -> DialError:
    return DialError(Failure.TIMEOUT, f"connect to {host}:{port} timed out after {timeout:g}s")


def connect_failed(exc: OSError, host: str, port: int) -> DialError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return DialError(failure_for_os_error(exc), f"connect to {host}:{port} failed: {reason}")


def _allowed_addresses(policy: EgressPolicy, host: str, port: int,
                       addresses: list[tuple[int, tuple]]) -> list[tuple[int, tuple]]:
    """The addresses the policy allows; none: NOT_ALLOWED naming what denied the first one."""
    allowed, first_denial = [], None
    for family, sockaddr in addresses:
        address = parse_address(sockaddr[0])
        verdict = policy.check(host, port, address)
        if verdict.allowed:
            allowed.append((family, sockaddr))
        elif first_denial is None:
            first_denial = verdict.reason if address is None or str(address) == host else (
                f"{verdict.reason} ({host} resolves to {address})")
    if not allowed:
        raise DialError(Failure.NOT_ALLOWED, first_denial or f"{host} resolves to no address")
    return allowed


def _literal_address(host: str, port: int) -> list[tuple[int, tuple]] | None:
    """An IP literal needs no resolver round trip."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return [(socket.AF_INET, (host, port))]
    return [(socket.AF_INET6, (host, port, 0, 0))]


async def _connect(family: int, address: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_happy_eyeballs(addresses: list[tuple[int, tuple]], delay: float) -> socket.socket:
    """Try addresses in order, starting the next one `delay` seconds after the last (RFC 8305)."""
    if len(addresses) == 1:
        return await _connect(*addresses[0])
    errors: list[OSError] = []
    winner: socket.socket | None = None
    pending: set[asyncio.Task[socket.socket]] = set()
    try:
        for family, address in addresses:
            pending.add(asyncio.ensure_future(_connect(family, address)))
            done, _ = await asyncio.wait(pending, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            winner = _take_winner(done, pending, errors)
            if winner:
                return winner
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            winner = _take_winner(done, pending, errors)
            if winner:
                return winner
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            try:
                (await task).close()
            except BaseException:
                pass
    if len({e.errno for e in errors}) == 1:
        raise errors[0]
    raise OSError(errors[-1].errno, "; ".join(str(e) for e in errors))


def _take_winner(done: set, pending: set, errors: list[OSError]) -> socket.socket | None:
    winner = None
    for task in done:
        pending.discard(task)
        exc = task.exception()
        if exc is None and winner is None:
            winner = task.result()
        elif exc is None:
            task.result().close()
        elif isinstance(exc, OSError):
            errors.append(exc)
        else:
            raise exc
    return winner


def _interleave_families(infos: list) -> list[tuple[int, tuple]]:
    """Alternate address families, keeping the resolver's order within each (RFC 8305 section 4)."""
    by_family: dict[int, list[tuple]] = {}
    for family, _type, _proto, _name, address in infos:
        entries = by_family.setdefault(family, [])
        if address not in entries:
            entries.append(address)
    queues = list(by_family.items())
    ordered: list[tuple[int, tuple]] = []
    while any(addrs for _, addrs in queues):
        for family, addrs in queues:
            if addrs:
                ordered.append((family, addrs.pop(0)))
    return ordered
