"""Keep zep's own environment from pointing proxy variables at zep itself.

The OpenZiti native library reaches its controller and routers through the proxy named in
`http_proxy` (and tools zep may start read the others). A runner that exports
`http_proxy=http://127.0.0.1:8080` for its jobs and starts zep in the same environment would
have the SDK send its control traffic into zep, which would route it back out: a loop at best.
So, at start and before the SDK is imported, any such variable that names zep's own listen
address and port is removed, with a warning naming the variable and never its value.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Iterable, MutableMapping

log = logging.getLogger("zep")

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}
_WILDCARDS = {"", "0.0.0.0", "::"}


def proxy_endpoint(value: str) -> tuple[str, int] | None:
    """(host, port) of a proxy variable's value (`scheme://[user:pass@]host[:port]` or `host:port`)."""
    text = value.strip()
    if not text:
        return None
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname.lower(), port


def _is_local(host: str) -> bool:
    if host in ("localhost", "localhost.", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def names_zep(host: str, port: int, listen_host: str, listen_ports: Iterable[int]) -> bool:
    """Whether (host, port) reaches one of zep's listeners (ports 0, chosen at bind time, cannot be named)."""
    if port not in {p for p in listen_ports if p}:
        return False
    listen = listen_host.strip("[]").lower()
    if host == listen:
        return True
    if listen in _WILDCARDS:
        return _is_local(host) or host == socket.gethostname().lower()
    return _is_local(listen) and _is_local(host)


def remove_self_proxies(environ: MutableMapping[str, str], listen_host: str, listen_ports: Iterable[int]) -> list[str]:
    """Remove the proxy variables that point at zep; returns their names (each one is logged)."""
    ports = tuple(listen_ports)
    removed = []
    for name in PROXY_VARIABLES:
        endpoint = proxy_endpoint(environ.get(name, ""))
        if endpoint is not None and names_zep(*endpoint, listen_host, ports):
            del environ[name]
            removed.append(name)
            host = f"[{endpoint[0]}]" if ":" in endpoint[0] else endpoint[0]
            log.warning("removed %s from zep's environment: it points at zep itself (%s:%d), and the OpenZiti "
                        "library would send its controller traffic back into zep", name, host, endpoint[1])
    return removed
