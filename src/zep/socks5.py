"""Sans-IO SOCKS5 server handshake (RFC 1928, with RFC 1929 user/password auth).

Feed the bytes a client sends; get back what to write and, at the end, either the
destination to dial or a refusal. Only CONNECT is supported. Nothing here touches a
socket, so any byte string can be fed in any split and the result is the same.

Choices where the RFCs leave room:
- RSV in the request is ignored rather than checked: it carries no meaning, and
  rejecting it would only break sloppy clients.
- Domain names are passed on exactly as sent, unresolved, but must be printable
  ASCII without spaces (IDNs arrive as punycode); anything else is refused with
  HOST_UNREACHABLE, so no control byte ever reaches a resolver or a log line.
- An empty domain name and port 0 name no destination at all: GENERAL_FAILURE.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass

from .auth import Authenticator
from .text import printable

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

_VERSION = 0x05
_AUTH_VERSION = 0x01
_NO_AUTH = 0x00
_USER_PASSWORD = 0x02
_NO_ACCEPTABLE_METHOD = 0xFF
_CONNECT = 0x01
_ATYP_IPV4 = 0x01
_ATYP_DOMAIN = 0x03
_ATYP_IPV6 = 0x04
_TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record
_HTTP_METHOD_INITIALS = b"CDGHOPT"  # CONNECT DELETE GET HEAD OPTIONS POST PUT PATCH TRACE


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the client and keep reading."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Handshake complete: dial (host, port), then send `connect_reply(...)`."""

    host: str  # IPv4/IPv6 literal (IPv6 without brackets) or the domain name as sent
    port: int
    early: bytes  # bytes pipelined after the request; deliver them upstream first


@dataclass(frozen=True, slots=True)
class Refuse:
    """Write `data` (possibly empty), then close. `reason` is for the log (it never carries a
    user name: see `Socks5Handshake.offered_username`)."""

    data: bytes
    reason: str
    auth_failed: bool = False  # refused for who the client is, not for what it asked


Event = Send | ConnectRequest | Refuse


class Socks5Error(Exception):
    """The handshake object was misused (not raised for anything a client sends)."""


class _Phase(enum.Enum):
    GREETING = enum.auto()
    AUTH = enum.auto()
    REQUEST = enum.auto()
    DONE = enum.auto()


class Socks5Handshake:
    def __init__(self, credentials: Authenticator | None) -> None:
        self._credentials = credentials
        self._buffer = bytearray()
        self._phase = _Phase.GREETING
        self.username: str | None = None  # once authenticated
        self.offered_username: str | None = None  # what a client that failed to authenticate gave

    def feed(self, data: bytes) -> list[Event]:
        """Consume client bytes; [] means more are needed. Ends with ConnectRequest or Refuse."""
        if self._phase is _Phase.DONE:
            raise Socks5Error("feed() after the handshake finished")
        self._buffer += data
        events: list[Event] = []
        while self._phase is not _Phase.DONE:
            if self._phase is _Phase.GREETING:
                event = self._greeting()
            elif self._phase is _Phase.AUTH:
                event = self._auth()
            else:
                event = self._request()
            if event is None:
                break
            events.append(event)
        return events

    def _greeting(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != _VERSION:
            # SOCKS4, HTTP, TLS or noise: there is no SOCKS5 way to answer, so just close.
            return self._refuse(b"", wrong_protocol(buf[0]))
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        end = 2 + buf[1]
        offered = bytes(buf[2:end])
        del buf[:end]
        wanted = _NO_AUTH if self._credentials is None else _USER_PASSWORD
        if wanted not in offered:
            return self._refuse(
                bytes([_VERSION, _NO_ACCEPTABLE_METHOD]),
                f"no acceptable authentication method (client offered {offered.hex() or 'none'}, "
                f"need {wanted:02x})",
                auth_failed=True,
            )
        self._phase = _Phase.REQUEST if wanted == _NO_AUTH else _Phase.AUTH
        return Send(bytes([_VERSION, wanted]))

    def _auth(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != _AUTH_VERSION:
            return self._refuse(b"\x01\x01", f"bad user/password auth version 0x{buf[0]:02x}", auth_failed=True)
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        username = bytes(buf[2 : 2 + ulen])
        password = bytes(buf[3 + ulen : end])
        del buf[:end]
        name = username.decode("utf-8", "replace")
        assert self._credentials is not None  # AUTH is only entered with credentials
        if not self._credentials.matches(username, password):
            self.offered_username = name
            return self._refuse(b"\x01\x01", "authentication failed", auth_failed=True)
        self.username = name
        self._phase = _Phase.REQUEST
        return Send(b"\x01\x00")

    def _request(self) -> Event | None:
        buf = self._buffer
        if len(buf) < 4:
            return None
        version, command, _rsv, atyp = buf[:4]
        if version != _VERSION:
            return self._refuse(connect_reply(GENERAL_FAILURE), f"bad version 0x{version:02x} in request")
        if command != _CONNECT:
            return self._refuse(
                connect_reply(COMMAND_NOT_SUPPORTED), f"command 0x{command:02x} not supported (only CONNECT)"
            )
        if atyp == _ATYP_IPV4:
            start, length = 4, 4
        elif atyp == _ATYP_IPV6:
            start, length = 4, 16
        elif atyp == _ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            start, length = 5, buf[4]
            if length == 0:
                return self._refuse(connect_reply(GENERAL_FAILURE), "empty domain name")
        else:
            return self._refuse(connect_reply(ADDRESS_TYPE_NOT_SUPPORTED), f"address type 0x{atyp:02x} not supported")
        end = start + length + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[start : start + length])
        port = int.from_bytes(buf[end - 2 : end], "big")
        early = bytes(buf[end:])
        buf.clear()
        if atyp == _ATYP_IPV4:
            host = socket.inet_ntop(socket.AF_INET, raw)
        elif atyp == _ATYP_IPV6:
            host = socket.inet_ntop(socket.AF_INET6, raw)
        elif all(0x21 <= byte <= 0x7E for byte in raw):
            host = raw.decode("ascii")
        else:
            return self._refuse(connect_reply(HOST_UNREACHABLE), f"unusable domain name \"{printable(raw)}\"")
        if port == 0:
            return self._refuse(connect_reply(GENERAL_FAILURE), f"port 0 requested for {host}")
        self._phase = _Phase.DONE
        return ConnectRequest(host, port, early)

    def _refuse(self, data: bytes, reason: str, auth_failed: bool = False) -> Refuse:
        self._phase = _Phase.DONE
        self._buffer.clear()
        return Refuse(data, reason, auth_failed)


def wrong_protocol(first: int) -> str:
    """Why a connection whose first byte is not SOCKS5's version was closed, in the user's terms."""
    if first == 0x04:
        return "a SOCKS4 client on the SOCKS5 port: zep speaks SOCKS5 only (use a socks5h:// proxy URL)"
    if first == _TLS_HANDSHAKE:
        return ("a TLS handshake on the SOCKS5 port: the client was given an https:// proxy URL; "
                "use socks5h:// for this port")
    if first in _HTTP_METHOD_INITIALS:
        return ("an HTTP request on the SOCKS5 port: use a socks5h:// proxy URL for this port, "
                "or send HTTP to the HTTP proxy port")
    return f"not a SOCKS5 client (first byte 0x{first:02x})"


def connect_reply(reply: int, bound: tuple[str, int] | tuple[str, int, int, int] | None = None) -> bytes:
    """The reply to a request: VER REP RSV ATYP BND.ADDR BND.PORT.

    `bound` is a getsockname() result (IPv4 or IPv6); None sends 0.0.0.0:0, which is
    what clients get when the bound address means nothing to them. Raises ValueError
    for a host that is not an IP address.
    """
    if bound is None:
        address, port = bytes([_ATYP_IPV4, 0, 0, 0, 0]), 0
    else:
        # getsockname() may carry an IPv6 scope ("fe80::1%eth0"); the wire format has no room for it.
        address, port = _packed(bound[0].partition("%")[0]), bound[1]
    return bytes([_VERSION, reply, 0x00]) + address + port.to_bytes(2, "big")


def _packed(host: str) -> bytes:
    """ATYP and address of an IP literal (inet_pton: this runs once per tunnel)."""
    try:
        return bytes([_ATYP_IPV4]) + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return bytes([_ATYP_IPV6]) + socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"{host!r} is not an IP address") from None
