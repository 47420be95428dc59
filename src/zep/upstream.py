"""The upstream proxy for the fallback route: where it is, its credentials, and its exceptions.

`UpstreamProxy.parse(url, no_proxy)` builds a frozen value from text (so a tenant can carry its
own): `http://[user:pass@]host[:port]` (HTTP CONNECT, Basic credentials; port 80 by default) or
`socks5h://[user:pass@]host[:port]` (SOCKS5 with user/password authentication, host names
passed unresolved; port 1080 by default). Credentials may be percent-encoded. `label` is what
messages and logs show: the URL without the credentials. Parse errors never repeat the URL.

`NoProxy` is the list of destinations that go direct instead, NO_PROXY style, separated by
commas or spaces: `*` (everything), a name (that name and every name under it), `.suffix` or
`*.suffix` (the same), an IP address or CIDR range (matches IP literals only: zep does not
resolve a name to decide), and any of these with `:port` (`[v6]:port` for IPv6).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field

from zep.egress import Network, normalize_name, parse_address
from zep.errors import ConfigError

SCHEMES = {"http": 80, "socks5h": 1080}


@dataclass(frozen=True)
class NoProxyEntry:
    name: str | None = None  # that name and every name under it
    network: Network | None = None
    port: int | None = None  # None: every port

    def matches(self, name: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            address = parse_address(name)
            return address is not None and address.version == self.network.version and address in self.network
        return name == self.name or name.endswith("." + str(self.name))


@dataclass(frozen=True)
class NoProxy:
    entries: tuple[NoProxyEntry, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        entries: list[NoProxyEntry] = []
        everything = False
        for item in text.replace(",", " ").split():
            if item == "*":
                everything = True
            else:
                entries.append(_no_proxy_entry(item))
        return cls(tuple(entries), everything)

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        name = normalize_name(host)
        return any(entry.matches(name, port) for entry in self.entries)


def _no_proxy_entry(item: str) -> NoProxyEntry:
    host, port = item, None
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"no-proxy entry {item!r}: a bracketed address is [ADDRESS] or [ADDRESS]:PORT")
        port = _port(item, rest[1:]) if rest else None
    elif item.count(":") == 1:
        host, _colon, port_text = item.partition(":")
        port = _port(item, port_text)
    if "/" in host or parse_address(host) is not None:
        try:
            return NoProxyEntry(network=ipaddress.ip_network(host.partition("%")[0], strict=False), port=port)
        except ValueError:
            raise ConfigError(f"no-proxy entry {item!r} is not an IP address or CIDR range") from None
    name = normalize_name(host.removeprefix("*").lstrip("."))
    if not name or any(c in name for c in "*/@?#[] "):
        raise ConfigError(f"no-proxy entry {item!r} is not a host name, .domain, IP address or CIDR range")
    return NoProxyEntry(name=name, port=port)


def _port(item: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"no-proxy entry {item!r}: the port must be 1-65535")
    return int(text)


@dataclass(frozen=True)
class UpstreamProxy:
    scheme: str  # "http" or "socks5h"
    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def parse(cls, url: str, no_proxy: str = "") -> UpstreamProxy:
        """Raises ConfigError saying what is wrong; the message never repeats the URL."""
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:  # a bad port or a malformed IPv6 host
            raise ConfigError(f"the upstream proxy URL is malformed ({_without_values(exc)})") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            hint = "; socks5h:// passes names unresolved, which zep needs" if scheme == "socks5" else ""
            raise ConfigError(f"the upstream proxy must be an http:// or socks5h:// URL, not {scheme or 'no'} scheme{hint}")
        if not parts.hostname:
            raise ConfigError(f"the upstream proxy URL ({scheme}://) has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"the upstream proxy URL ({scheme}://{parts.hostname}) must not have a path or query")
        username = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        if scheme == "socks5h" and (len(username.encode()) > 255 or len(password.encode()) > 255):
            raise ConfigError("the SOCKS5 upstream proxy's user name and password must be at most 255 bytes each")
        return cls(scheme, parts.hostname, port or SCHEMES[scheme], username, password, NoProxy.parse(no_proxy))

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)


def _without_values(exc: ValueError) -> str:
    """urllib's messages can quote the port text, which sits next to the password: keep the gist."""
    message = str(exc)
    return "bad port" if "port" in message.lower() else "bad host"
