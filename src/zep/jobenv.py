"""The proxy variables a job gets from a zep: one set, for `zep run` and for `zep env`.

Both spellings of each variable are set, because tools disagree: curl reads `http_proxy` only in
lower case, wget and apt read only lower case, Go and Python read either. `NO_PROXY` keeps
loopback away from the proxy (service containers and local servers), plus what the user adds.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from urllib.parse import quote

from zep.auth import Credentials
from zep.readyfile import Ready
from zep.ziti import SECRET_VARIABLES

DEFAULT_NO_PROXY = ("localhost", "127.0.0.1", "::1")
FORMATS = ("sh", "github", "dotenv", "json")


def proxy_url(scheme: str, address: str, credentials: Credentials | None) -> str:
    if credentials is None:
        return f"{scheme}://{address}"
    return f"{scheme}://{quote(credentials.username, safe='')}:{quote(credentials.password, safe='')}@{address}"


def variables(ready: Ready, no_proxy: Iterable[str] = ()) -> dict[str, str]:
    """ALL_PROXY (SOCKS5, names resolved by zep), HTTP(S)_PROXY (the HTTP proxy), NO_PROXY; both cases.

    With one listener off, every variable points at the other one.
    """
    socks = proxy_url("socks5h", ready.socks5, ready.credentials) if ready.socks5 else None
    http = proxy_url("http", ready.http, ready.credentials) if ready.http else None
    everything = socks or http
    web = http or socks
    assert everything is not None and web is not None  # a zep always serves at least one protocol
    hosts = ",".join(dict.fromkeys((*DEFAULT_NO_PROXY, *ready.no_proxy, *no_proxy)))
    out: dict[str, str] = {}
    for name, value in (("ALL_PROXY", everything), ("HTTP_PROXY", web), ("HTTPS_PROXY", web), ("NO_PROXY", hosts)):
        out[name] = value
        out[name.lower()] = value
    return out


def job_environment(environ: dict[str, str], proxy_variables: dict[str, str]) -> dict[str, str]:
    """zep's environment for a job: without zep's identities and tokens (ziti.SECRET_VARIABLES) or other
    proxy settings, with this zep's."""
    names = {name.upper() for name in proxy_variables}
    kept = {key: value for key, value in environ.items()
            if key.upper() not in names and key not in SECRET_VARIABLES}
    return {**kept, **proxy_variables}


def render(proxy_variables: dict[str, str], form: str) -> str:
    """The variables as `sh` exports, `github` / `dotenv` lines (NAME=value), or one JSON object."""
    if form == "json":
        return json.dumps(proxy_variables, indent=2) + "\n"
    if form == "sh":
        return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in proxy_variables.items())
    if form in ("github", "dotenv"):
        # Proxy URLs hold no spaces, quotes or newlines, so both formats take the value as it is.
        return "".join(f"{name}={value}\n" for name, value in proxy_variables.items())
    raise ValueError(f"unknown format {form!r}")
