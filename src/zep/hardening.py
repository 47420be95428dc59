"""Keep other processes of the same user out of zep's memory and start-up environment.

`prctl(PR_SET_DUMPABLE, 0)` stops ptrace and /proc/PID/{mem,environ,maps} for processes of the
same user (the kernel then treats zep like a set-uid program), so they cannot read the identity's
private key or the `ZITI_IDENTITY` zep started with. Root, or anyone with CAP_SYS_PTRACE, still
can. A program zep starts (`zep run -- CMD`) is dumpable again after its exec, as usual.
`--dumpable` (ZEP_DUMPABLE) leaves zep as it is, for debuggers, profilers and benchmarks that
attach to it or list its file descriptors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("zep")

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    result = libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        raise OSError(ctypes.get_errno(), "prctl failed")
    return result


def make_undumpable() -> bool:
    """Mark this process non-dumpable; False (with a warning) where the system does not allow it."""
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError) as exc:  # no prctl: not Linux
        log.warning("cannot mark zep non-dumpable (%s): processes of this user may read its memory", exc)
        return False
    return True


def is_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0
