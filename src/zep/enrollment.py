"""One-time enrollment tokens: where they come from, what they must look like, and the file the
enrolled identity goes to. The SDK call itself is `zep.ziti.enroll`.

A token is a JWT (`header.claims.signature`, base64url) issued by the controller named in its
`iss` claim. zep checks that shape before the SDK sees the token: the native library (1.18.3)
never returns from `Ziti_enroll_identity` when the token cannot be parsed. Neither the token nor
the identity it turns into is ever logged or put on a command line, and both are written only to
files no one else can read (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

TOKEN_VARIABLE = "ZITI_ENROLL_TOKEN"
STDIN = "-"


class EnrollmentError(Exception):
    """A token or an output file zep cannot use; the message names it."""


@dataclass(frozen=True)
class EnrollmentToken:
    source: str  # how messages name it: ZITI_ENROLL_TOKEN, a file, or stdin
    controller: str
    text: str = field(repr=False)


def read_token_file(path: str, setting: str) -> str:
    """The token held in a file, or on stdin for `-`."""
    if path == STDIN:
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as exc:
        if looks_like_token(path):  # then the message must not repeat it
            raise EnrollmentError(f"{setting} names no file but looks like a token itself: put the token in a "
                                  f"file, or in {TOKEN_VARIABLE}") from None
        raise EnrollmentError(f"cannot read the enrollment token file {path}: {exc.strerror}") from None


def looks_like_token(text: str) -> bool:
    parts = text.strip().split(".")
    return len(parts) == 3 and _segment(parts[0]) is not None


def token_from_file(path: str, setting: str) -> EnrollmentToken:
    """The token in a file (`-`: stdin), checked; `setting` names where the path came from."""
    return parse_token(read_token_file(path, setting), "stdin" if path == STDIN else path)


def parse_token(text: str, source: str, now: float | None = None) -> EnrollmentToken:
    """Check that `text` is an enrollment token that has not expired; returns it with its controller."""
    token = text.strip()
    if not token:
        raise EnrollmentError(f"{source} is empty: expected an enrollment token (a JWT)")
    parts = token.split(".")
    header = _segment(parts[0]) if len(parts) == 3 else None
    claims = _segment(parts[1]) if header is not None else None
    if header is None or claims is None or not parts[2]:
        raise EnrollmentError(f"{source} is not an enrollment token (a JWT: three base64url parts joined by dots)")
    controller = claims.get("iss")
    if not isinstance(controller, str) or urlsplit(controller).scheme not in ("http", "https"):
        raise EnrollmentError(f"{source} is a JWT but not a Ziti enrollment token (its iss is not a controller URL)")
    expires = claims.get("exp")
    if isinstance(expires, (int, float)) and expires < (time.time() if now is None else now):
        when = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise EnrollmentError(f"the enrollment token from {source} expired at {when}: ask for a new one")
    return EnrollmentToken(source, controller, token)


def _segment(part: str) -> dict[str, Any] | None:
    """A base64url JSON object, or None."""
    try:
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError):
        return None
    return value if isinstance(value, dict) else None


class IdentityOutput:
    """Where an enrolled identity is written, claimed before enrolling (a one-time token must not be
    spent on an identity that then cannot be saved) and written mode 0600.

    Without `force` the file itself is created exclusively now; with it, a temporary file beside
    it replaces the old one at `commit()`. `discard()` removes what was claimed.
    """

    def __init__(self, path: str, force: bool = False, hint: str | None = "--force replaces it") -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise EnrollmentError(f"cannot write the identity to {path}: it is a directory")
        if not os.path.isdir(directory):
            raise EnrollmentError(f"cannot write the identity to {path}: directory {directory} does not exist")
        try:
            if force:
                fd, self._temporary = tempfile.mkstemp(dir=directory, prefix=".zep-identity-", suffix=".tmp")
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                self._temporary = None
        except FileExistsError:
            raise EnrollmentError(f"{path} already exists: not overwriting it" + (f" ({hint})" if hint else "")) from None
        except OSError as exc:
            raise EnrollmentError(f"cannot write the identity to {path}: {exc.strerror}") from None
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "wb")

    def commit(self, data: bytes) -> str:
        with self._file:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._temporary is not None:
            os.replace(self._temporary, self.path)
        return self.path

    def discard(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary or self.path)

