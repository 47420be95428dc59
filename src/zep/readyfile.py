"""The ready file: where a running zep listens (and its credentials), for scripts and `zep env`.

It is written atomically (a temporary file in the same directory, then a rename) with mode 0600,
because it may hold the proxy password, and removed when zep exits. A file left behind by a zep
that is gone is replaced; one whose zep still runs stops a second zep from starting, so that two
jobs never end up sharing one proxy (and one identity) by accident.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from zep.auth import Credentials
from zep.config import ENVIRONMENT, FLAGS

log = logging.getLogger("zep")

SETTING = f"{ENVIRONMENT['ready_file']}/{FLAGS['ready_file']}"


class ReadyFileError(Exception):
    """The ready file cannot be used; the message names the file and the setting."""


@dataclass(frozen=True)
class Ready:
    """What a ready file says: who is listening where, and with which credentials."""

    pid: int
    socks5: str | None  # "127.0.0.1:1080", or None when the listener is off
    http: str | None
    credentials: Credentials | None
    no_proxy: tuple[str, ...] = ()  # hosts that jobs should reach without the proxy
    admin: str | None = None  # the admin listener (health, readiness, metrics), when there is one
    workers: tuple[tuple[str, int], ...] = ()  # `zep serve --workers`: (id, pid) of each worker process

    def document(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid}
        if self.socks5:
            out["socks5"] = self.socks5
        if self.http:
            out["http"] = self.http
        if self.credentials is not None:
            out.update(username=self.credentials.username, password=self.credentials.password)
        if self.no_proxy:
            out["no_proxy"] = list(self.no_proxy)
        if self.admin:
            out["admin"] = self.admin
        if self.workers:
            out["workers"] = [{"id": worker, "pid": pid} for worker, pid in self.workers]
        return out

    @classmethod
    def from_document(cls, document: Any, path: str) -> Ready:
        try:
            credentials = None
            if document.get("username"):
                credentials = Credentials(str(document["username"]), str(document["password"]))
            return cls(int(document["pid"]), document.get("socks5"), document.get("http"), credentials,
                       tuple(str(host) for host in document.get("no_proxy", ())), document.get("admin"),
                       tuple((str(w["id"]), int(w["pid"])) for w in document.get("workers", ())))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ReadyFileError(f"{path} ({SETTING}) is not a zep ready file") from None


def claim(path: str) -> None:
    """Before start-up: make sure `path` can become this zep's ready file (raises ReadyFileError)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ReadyFileError(f"cannot write the ready file {path} ({SETTING}): directory {directory} does not exist")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ReadyFileError(f"cannot read the ready file {path} ({SETTING}): {exc.strerror}") from None
    if not text.strip():
        return  # an empty file made ahead for us (mktemp)
    try:
        previous = Ready.from_document(json.loads(text), path)
    except ValueError:
        raise ReadyFileError(f"{path} ({SETTING}) exists and is not a zep ready file: "
                             "remove it or choose another path") from None
    if zep_is_running(previous.pid):
        raise ReadyFileError(f"the ready file {path} ({SETTING}) belongs to a zep that is still running "
                             f"(pid {previous.pid}): stop it, or give this zep another ready file")
    log.warning("replacing the stale ready file %s: the zep that wrote it (pid %d) is gone", path, previous.pid)


def read(path: str) -> Ready:
    """The ready file of a running zep (for `zep env`); raises ReadyFileError naming what is wrong."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise ReadyFileError(f"no ready file at {path} ({SETTING}): is `zep serve --ready-file {path}` running?") from None
    except OSError as exc:
        raise ReadyFileError(f"cannot read the ready file {path} ({SETTING}): {exc.strerror}") from None
    try:
        ready = Ready.from_document(json.loads(text), path)
    except ValueError:
        raise ReadyFileError(f"{path} ({SETTING}) is not a zep ready file") from None
    if not zep_is_running(ready.pid):
        raise ReadyFileError(f"the ready file {path} ({SETTING}) is stale: its zep (pid {ready.pid}) is not running")
    return ready


def write(path: str, ready: Ready) -> None:
    """Atomically replace `path` with `ready`, readable by this user only."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        # mkstemp creates the file with mode 0600 whatever the umask.
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise ReadyFileError(f"cannot write the ready file {path} ({SETTING}): {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(ready.document(), out)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ReadyFileError(f"cannot write the ready file {path} ({SETTING}): {exc.strerror}") from None


def remove(path: str, pid: int) -> None:
    """Remove `path` if it is still the ready file of process `pid` (never another zep's)."""
    try:
        with open(path, "rb") as f:
            owner = json.loads(f.read()).get("pid")
    except (OSError, ValueError, AttributeError):
        return
    if owner == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def published(path: str | None, ready: Ready) -> Iterator[None]:
    """The ready file exists while the block runs (nothing happens without a path)."""
    if path is None:
        yield
        return
    write(path, ready)
    try:
        yield
    finally:
        remove(path, ready.pid)


def zep_is_running(pid: int) -> bool:
    """Whether `pid` is a live zep other than this process (a reused pid running something else is not)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: assume it is that zep
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command_line = f.read()
    except OSError:
        return True  # no /proc to ask: trust the pid
    return b"zep" in command_line
