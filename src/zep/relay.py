"""Chooses the relay implementation, the way yarl chooses its quoting module.

The compiled splice engine (``zep._relay``) unless ``ZEP_NO_EXTENSIONS`` is set
(to anything non-empty), the platform is not Linux, or the extension is not
built; otherwise the pure-Python relay (``zep._relay_py``). Both implement the
same contract, ``zep.relay_result.Relay``: ``start()`` once per process before the first pair,
``ready()``, ``relay()``.
"""

from __future__ import annotations

import os
import sys

from zep.relay_result import Relay


def _choose() -> tuple[Relay, str, str]:
    if os.environ.get("ZEP_NO_EXTENSIONS"):
        why = "ZEP_NO_EXTENSIONS is set"
    elif not sys.platform.startswith("linux"):
        why = f"the compiled relay is Linux only (this is {sys.platform})"
    else:
        try:
            from zep import _relay as compiled
        except ImportError as exc:
            why = f"compiled extension not built: {exc}"
        else:
            return compiled, "cython", "compiled splice engine (epoll thread, splice through pipes)"
    from zep import _relay_py as pure

    return pure, "python", why


implementation, IMPLEMENTATION, WHY = _choose()
start = implementation.start  # before the first pair: the server calls it before it listens
ready = implementation.ready
relay = implementation.relay
start_pair = implementation.start_pair  # relay() on callbacks (zep.fastpath)
# The engine's counters (a dict) for the metrics; None for the pure-Python relay, which keeps none.
stats = getattr(implementation, "stats", None)
# SOCKS5 handshakes in the engine (zep.nativepath); None for the pure-Python relay.
start_socks = getattr(implementation, "start_socks", None)
Verdicts = getattr(implementation, "Verdicts", None)  # what start_socks() remembers, one per router

__all__ = ["relay", "start_pair", "start_socks", "Verdicts", "start", "ready", "stats", "implementation", "IMPLEMENTATION", "WHY"]
