"""Salted password hashes for tenants' proxy passwords (`zep hash-password`), with scrypt.

A hash reads `scrypt$<log2 n>$<r>$<p>$<salt>$<key>` (salt and key in unpadded base64). Checking
one costs tens of milliseconds on purpose, so a `Verifier` remembers the pairs it has accepted
(as keyed digests, never the password) and answers a known-good pair at once: clients that
authenticate every request (HTTP Basic) are not slowed down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict

_SCHEME = "scrypt"
_LOG2_N, _R, _P = 14, 8, 1  # 16 MiB of memory per check
_SALT_BYTES, _KEY_BYTES = 16, 32
_MAX_MEMORY = 64 * 1024 * 1024
_REMEMBERED = 1024  # accepted (user, password) pairs kept per process


class BadHash(ValueError):
    """The text is not a hash `hash_password` could have written."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _derive(password, salt, _LOG2_N, _R, _P)
    return "$".join((_SCHEME, str(_LOG2_N), str(_R), str(_P), _b64(salt), _b64(key)))


def password_from_text(text: str) -> str:
    """A password as read from a file or a pipe: one trailing line ending is not part of it."""
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return text[: -len(ending)]
    return text


def check_hash_syntax(text: str) -> None:
    _parse(text)


def verify_password(password: str | bytes, text: str) -> bool:
    log2_n, r, p, salt, key = _parse(text)
    return hmac.compare_digest(_derive(password, salt, log2_n, r, p), key)


class Verifier:
    """Checks (user, password) against one stored hash, remembering the pairs it accepted."""

    def __init__(self, username: str, password_hash: str) -> None:
        check_hash_syntax(password_hash)
        self.username = username
        self._hash = password_hash
        self._secret = secrets.token_bytes(32)  # per process: the remembered digests mean nothing elsewhere
        self._accepted: OrderedDict[bytes, None] = OrderedDict()

    def matches(self, username: str | bytes, password: str | bytes) -> bool:
        user = _utf8(username)
        user_ok = hmac.compare_digest(user, _utf8(self.username))
        digest = self._digest(user, password)
        if digest in self._accepted:  # only accepted pairs are remembered, so the user name is right
            self._accepted.move_to_end(digest)
            return True
        if not user_ok:
            return False
        if not verify_password(password, self._hash):
            return False
        self._keep(digest)
        return True

    def remember(self, username: str | bytes, password: str | bytes) -> None:
        """Accept this pair from now on without checking it: another zep process (the front) has
        checked it against the same hash."""
        user = _utf8(username)
        if hmac.compare_digest(user, _utf8(self.username)):
            self._keep(self._digest(user, password))

    def _digest(self, user: bytes, password: str | bytes) -> bytes:
        return hmac.new(self._secret, user + b"\0" + _utf8(password), hashlib.sha256).digest()

    def _keep(self, digest: bytes) -> None:
        self._accepted[digest] = None
        self._accepted.move_to_end(digest)
        if len(self._accepted) > _REMEMBERED:
            self._accepted.popitem(last=False)


def _derive(password: str | bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(_utf8(password), salt=salt, n=1 << log2_n, r=r, p=p, maxmem=_MAX_MEMORY,
                          dklen=_KEY_BYTES)


def _parse(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.strip().split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise BadHash("not a zep password hash (expected scrypt$...; make one with `zep hash-password`)")
    try:
        log2_n, r, p = (int(v) for v in parts[1:4])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise BadHash("damaged zep password hash (bad number or base64)") from None
    if not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and salt and len(key) == _KEY_BYTES):
        raise BadHash("zep password hash with parameters out of range")
    if (1 << log2_n) * r * 128 * 2 > _MAX_MEMORY:
        raise BadHash("zep password hash needs more memory than zep allows for one check")
    return log2_n, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _utf8(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")
