"""The upstream-proxy dialer: reach a destination through an HTTP CONNECT or SOCKS5 proxy.

Failures map onto the same `Failure`s as a direct dial, so clients see the same SOCKS replies
and HTTP statuses: the proxy's own answer for the destination (CONNECT 403, 502, 504, a SOCKS
reply code) becomes that failure; trouble with the proxy itself (refused, closed, nonsense,
credentials) is GENERAL with a detail naming the proxy by its label, never its credentials.
The connect timeout covers the whole handshake. Bytes the proxy sent after its answer in the
same read are returned as `Upstream.early_down`: they belong to the destination.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket

from zep.dial import DialError, DirectDialer, Failure, Upstream
from zep.egress import EgressPolicy
from zep.upstream import UpstreamProxy

ROUTE = "proxy"
MAX_RESPONSE_HEAD = 16384
# A SOCKS5 reply code read from an upstream proxy (0x01 is its general failure, never UNAVAILABLE).
_SOCKS_FAILURES = {failure.socks_reply: failure for failure in Failure if failure is not Failure.UNAVAILABLE}
_HTTP_FAILURES = {403: Failure.NOT_ALLOWED, 502: Failure.HOST_UNREACHABLE, 504: Failure.TIMEOUT}


class _ProxyTrouble(Exception):
    """Something went wrong with the proxy itself (not with the destination it was asked for)."""


class _HandshakeReader:
    """Reads a proxy's answers and keeps whatever came after them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise _ProxyTrouble("closed the connection during the handshake")
        self.buffer += data

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def head(self) -> bytes:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_RESPONSE_HEAD:
                raise _ProxyTrouble(f"sent a response head larger than {MAX_RESPONSE_HEAD} bytes")
            await self._fill()
        return await self.exactly(end + 4)


class UpstreamProxyDialer:
    """Dials every destination through one upstream proxy, after the egress policy (by name:
    the proxy resolves, so address rules apply to IP literals only)."""

    def __init__(self, proxy: UpstreamProxy, policy: EgressPolicy | None = None) -> None:
        self.proxy = proxy
        self.policy = policy
        self._to_proxy = DirectDialer()

    async def dial(self, host: str, port: int, timeout: float) -> Upstream:
        if self.policy is not None and not (verdict := self.policy.check(host, port)).allowed:
            raise DialError(Failure.NOT_ALLOWED, verdict.reason)
        label = f"upstream proxy {self.proxy.label}"
        sock = None
        try:
            async with asyncio.timeout(timeout):
                sock = (await self._to_proxy.dial(self.proxy.host, self.proxy.port, timeout)).sock
                reader = _HandshakeReader(sock)
                if self.proxy.scheme == "http":
                    await self._http_connect(sock, reader, host, port, label)
                else:
                    await self._socks5_connect(sock, reader, host, port, label)
            return Upstream(sock, ROUTE, bytes(reader.buffer))
        except BaseException as exc:
            if sock is not None:
                sock.close()
            raise _as_dial_error(exc, label, sock is None, _authority(host, port), timeout) from None

    async def _http_connect(self, sock: socket.socket, reader: _HandshakeReader, host: str, port: int,
                            label: str) -> None:
        if any(c <= " " or c > "~" for c in host):
            raise DialError(Failure.HOST_UNREACHABLE, f"{label} cannot be asked for {host!r}: not a host name")
        authority = _authority(host, port)
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.proxy.has_credentials:
            token = base64.b64encode(f"{self.proxy.username}:{self.proxy.password}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        await asyncio.get_running_loop().sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = (await reader.head()).split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        status_text, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (status_text.isdigit() and len(status_text) == 3):
            raise _ProxyTrouble(f"answered CONNECT with something that is not HTTP: {status_line[:60]!r}")
        status = int(status_text)
        if 200 <= status < 300:
            return
        if status == 407 and self.proxy.has_credentials:
            raise DialError(Failure.GENERAL, f"upstream proxy refused zep's credentials (407 from {self.proxy.label})")
        if status == 407:
            raise DialError(Failure.GENERAL, f"{label} asks for credentials and none are configured (407)")
        raise DialError(_HTTP_FAILURES.get(status, Failure.GENERAL),
                        f"{label} answered CONNECT {authority} with {status} {reason}".rstrip())

    async def _socks5_connect(self, sock: socket.socket, reader: _HandshakeReader, host: str, port: int,
                              label: str) -> None:
        loop = asyncio.get_running_loop()
        credentials = self.proxy.has_credentials
        await loop.sock_sendall(sock, b"\x05\x02\x00\x02" if credentials else b"\x05\x01\x00")
        version, method = await reader.exactly(2)
        if version != 5:
            raise _ProxyTrouble("does not speak SOCKS5")
        if method == 0x02 and credentials:
            user, password = self.proxy.username.encode(), self.proxy.password.encode()
            await loop.sock_sendall(sock, b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            if (await reader.exactly(2))[1] != 0:
                raise DialError(Failure.GENERAL, f"upstream proxy refused zep's credentials ({self.proxy.label})")
        elif method != 0x00:
            why = "refused zep's credentials" if credentials else "asks for credentials and none are configured"
            raise DialError(Failure.GENERAL, f"{label} {why} (no acceptable SOCKS5 method)")
        await loop.sock_sendall(sock, b"\x05\x01\x00" + _socks_address(host, label) + port.to_bytes(2, "big"))
        version, reply, _reserved, atyp = await reader.exactly(4)
        if version != 5:
            raise _ProxyTrouble("sent a malformed SOCKS5 reply")
        if atyp == 0x01:
            await reader.exactly(4 + 2)
        elif atyp == 0x04:
            await reader.exactly(16 + 2)
        elif atyp == 0x03:
            await reader.exactly((await reader.exactly(1))[0] + 2)
        elif reply == 0:
            raise _ProxyTrouble(f"sent a SOCKS5 reply with address type {atyp}")
        if reply != 0:
            failure = _SOCKS_FAILURES.get(reply, Failure.GENERAL)
            raise DialError(failure, f"{label} could not connect {_authority(host, port)}: SOCKS5 reply {reply:#04x}")


def _as_dial_error(exc: BaseException, label: str, unreached: bool, target: str, timeout: float) -> BaseException:
    """What a failed handshake raises: a DialError naming the proxy; anything else (cancellation) as it is."""
    if isinstance(exc, TimeoutError):
        return DialError(Failure.TIMEOUT, f"{label} did not connect {target} within {timeout:g}s")
    if isinstance(exc, DialError) and unreached:  # the proxy itself could not be reached
        failure = Failure.TIMEOUT if exc.failure is Failure.TIMEOUT else Failure.GENERAL
        return DialError(failure, f"{label} cannot be reached: {exc.detail}")
    if isinstance(exc, _ProxyTrouble):
        return DialError(Failure.GENERAL, f"{label} {exc}")
    if isinstance(exc, OSError):
        return DialError(Failure.GENERAL, f"{label} failed during the handshake: {exc.strerror or exc}")
    return exc


def _socks_address(host: str, label: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        if not 0 < len(name) <= 255:
            raise DialError(Failure.HOST_UNREACHABLE, f"{label} cannot be asked for a name of {len(name)} bytes") from None
        return b"\x03" + bytes([len(name)]) + name
    return (b"\x01" if address.version == 4 else b"\x04") + address.packed


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
