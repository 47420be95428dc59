"""What `zep version` says about the OpenZiti SDK, found out in a child process.

Importing `openziti` loads its native library, which may fail, hang or bring the process down;
asking a child (`python -m zep.sdkinfo`) keeps `zep version` answering whatever happens. The
child imports the SDK through `ziti.import_sdk`, the one place that imports it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

PROBE_TIMEOUT = 20.0


def describe() -> str:
    """One line: the SDK's version and the native library it loads, or why there is none."""
    from zep.ziti import SECRET_VARIABLES

    environment = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
    try:
        result = subprocess.run([sys.executable, "-m", "zep.sdkinfo"], capture_output=True, text=True,
                                timeout=PROBE_TIMEOUT, env=environment, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"openziti: loading the SDK did not finish within {PROBE_TIMEOUT:g} s"
    if result.returncode != 0 or not result.stdout.strip():
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return f"openziti: loading the SDK failed (exit status {result.returncode}): {last}"
    return result.stdout.strip()


def probe() -> str:
    """In the child: import the SDK and read the native library's own version."""
    from zep import ziti

    if importlib.util.find_spec("openziti") is None:
        return f"openziti: not installed ({ziti.INSTALL_HINT} to reach Ziti services)"
    try:
        zitilib = ziti.import_sdk()
    except ziti.ZitiSetupError as exc:
        return f"openziti: installed, but it does not load: {exc}"
    package = sys.modules["openziti"]
    native = zitilib.version()
    return (f"openziti: {getattr(package, '__version__', 'unknown')}, native library "
            f"{_text(native.version)} ({_text(native.revision)}) from {zitilib.zitilib_path}")


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


if __name__ == "__main__":
    print(probe())
