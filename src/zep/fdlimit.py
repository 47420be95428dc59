"""The open-files limit, and the connection limit that fits it.

At start zep raises its soft RLIMIT_NOFILE to the hard limit, as HAProxy does (capped like
HAProxy's `fd-hard-limit`, so a limit of "infinity" does not size anything after it), and, unless
ZEP_MAXCONN says otherwise, allows as many connections as the limit can carry.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Never raise the soft limit past this: some hosts set the hard limit to about 2^30.
FD_CAP = 1 << 20
# Listeners, the admin listener, epoll and eventfds, log files, the SDK's own sockets.
RESERVED_FDS = 64
# A client and its upstream, plus a share of the relay's splice pipes: a pipe (2 fds) is held only
# while a direction has bytes in flight, and where none can be had that direction copies instead.
FDS_PER_CONNECTION = 3
# A Ziti upstream is a loopback socket whose other end (and its overlay side) the SDK holds.
ZITI_FDS_PER_CONNECTION = 2


@dataclass(frozen=True)
class OpenFiles:
    before: int  # the soft limit zep started with
    limit: int  # the soft limit now


def raise_open_files_limit() -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows (at most FD_CAP)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_CAP)
    before = current_limit()
    if before < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a sandbox may refuse: keep what we have
            return OpenFiles(before, before)
        return OpenFiles(before, target)
    return OpenFiles(before, before)


def current_limit() -> int:
    """The soft RLIMIT_NOFILE now (FD_CAP for "infinity")."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FD_CAP if soft == resource.RLIM_INFINITY else soft


def fds_per_connection(ziti: bool) -> int:
    return FDS_PER_CONNECTION + (ZITI_FDS_PER_CONNECTION if ziti else 0)


def max_connections_for(limit: int, ziti: bool) -> int:
    """How many client connections `limit` open files carry (at least 1)."""
    return max(1, (limit - RESERVED_FDS) // fds_per_connection(ziti))
