"""Chooses the relay implementation, the way yarl chooses its quoting module.

The compiled splice engine (``zep._relay``) unless ``ZEP_NO_EXTENSIONS`` is set
(to anything non-empty), the platform is not Linux, or the extension is not
built; otherwise the pure-Python relay (``zep._relay_py``). Both implement the
same contract (see ``zep.relay_result``).
"""

from __future__ import annotations

import os
import sys

from typing import Any


def _choose() -> tuple[Any, str, str]:
    if os.environ.get("ZEP_NO_EXTENSIONS"):
        why = "ZEP_NO_EXTENSIONS is set"
    elif not sys.platform.startswith("linux"):
        why = f"the compiled relay is Linux only (this is {sys.platform})"
    else:
        try:
            from zep._relay import relay as compiled
        except ImportError as exc:
            why = f"compiled extension not built: {exc}"
        else:
            return compiled, "cython", "compiled splice engine (epoll thread, splice through pipes)"
    from zep._relay_py import relay as pure

    return pure, "python", why


relay, IMPLEMENTATION, WHY = _choose()

__all__ = ["relay", "IMPLEMENTATION", "WHY"]
