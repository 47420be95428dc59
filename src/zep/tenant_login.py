"""Proxy logins when zep serves tenants: the user name says which tenant, its hash says whether.

The front checks every login against the tenant the user name belongs to (`TenantLogins`); a
tenant's worker checks later requests of a kept-alive connection against its own tenant only.
Each connection gets its own `Login`, which remembers the pair it accepted: the front passes that
pair to the tenant's worker (over their private socket), whose verifier then accepts it without
paying scrypt again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from zep.passwords import Verifier, hash_password, verify_password
from zep.tenants import Tenant


@dataclass(frozen=True)
class Accepted:
    """Who logged in on a connection."""

    tenant: str
    username: str
    password: str = field(repr=False)  # only ever sent to that tenant's worker


class TenantLogins:
    """The logins of a set of tenants (all of them in the front, one in a tenant's worker)."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._by_user = {_utf8(t.username): (t.name, t.verifier()) for t in tenants}

    def login(self) -> Login:
        """The credentials for one new connection."""
        return Login(self)

    def check(self, username: str | bytes, password: str | bytes) -> Accepted | None:
        entry = self._by_user.get(_utf8(username))
        if entry is None:
            # As slow as a wrong password, so that timing does not tell which user names exist.
            verify_password(password, _unknown_user_hash())
            return None
        tenant, verifier = entry
        if not verifier.matches(username, password):
            return None
        return Accepted(tenant, _text(username), _text(password))

    def remember(self, username: str, password: str) -> None:
        """A pair the front has accepted: accepted here without checking it again."""
        entry = self._by_user.get(_utf8(username))
        if entry is not None:
            entry[1].remember(username, password)

    def known(self, username: str) -> bool:
        return _utf8(username) in self._by_user


class Login:
    """One connection's credentials (the interface of zep.auth.Credentials), remembering who logged in."""

    __slots__ = ("_logins", "accepted")

    def __init__(self, logins: TenantLogins) -> None:
        self._logins = logins
        self.accepted: Accepted | None = None

    def matches(self, username: str | bytes, password: str | bytes) -> bool:
        accepted = self._logins.check(username, password)
        if accepted is not None:
            self.accepted = accepted
        return accepted is not None

    def login_name(self, offered: str) -> str:
        """What an access line may say about a user name that failed to log in: a tenant's, else "?"."""
        return offered if self._logins.known(offered) else "?"


@functools.cache
def _unknown_user_hash() -> str:
    return hash_password("no such user")


def _utf8(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _text(value: str | bytes) -> str:
    """Bytes from a SOCKS5 login as text that encodes back to the same bytes (and travels in JSON)."""
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")
