"""Proxy credentials: one user name and password, checked in constant time.

Shared by the SOCKS5 user/password sub-negotiation (RFC 1929) and HTTP
`Proxy-Authorization: Basic` (RFC 7617).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Protocol


class Authenticator(Protocol):
    """What an exchange checks logins with: `Credentials`, or a tenant's (zep.tenant_login)."""

    def matches(self, username: str | bytes, password: str | bytes) -> bool: ...

    def login_name(self, offered: str) -> str: ...


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)  # keep it out of logs and tracebacks

    def matches(self, username: str | bytes, password: str | bytes) -> bool:
        # Compare both fields every time so timing does not reveal which one was wrong.
        user_ok = hmac.compare_digest(_utf8(username), _utf8(self.username))
        password_ok = hmac.compare_digest(_utf8(password), _utf8(self.password))
        return user_ok & password_ok

    def login_name(self, offered: str) -> str:
        """What the access log may say about a user name that failed to log in: only a configured
        name, else "?" (people type passwords into user-name fields)."""
        return offered if offered == self.username else "?"


def random_credentials() -> Credentials:
    """Fresh credentials for one job (`zep run`, `--random-credentials`); URL-safe, so they fit in proxy URLs."""
    return Credentials(f"zep-{secrets.token_hex(4)}", secrets.token_urlsafe(24))


def _utf8(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        # A secret read from the environment keeps undecodable bytes as surrogates.
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates: still compare, never raise
        return value.encode("utf-8", "surrogatepass")


def parse_basic(header_value: bytes | None) -> tuple[str, str] | None:
    """`Basic base64(user:pass)` -> (user, pass); None when absent, another scheme, or malformed."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    if not colon:
        return None
    return username, password
