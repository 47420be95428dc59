"""`zep run -- CMD`: one command with a proxy of its own.

The proxy runs in this process on ports the kernel picks, with credentials made for this run;
only CMD's environment holds them (never a command line or a file), and zep's own environment
never points at itself (the Ziti native library reaches its controller through `http_proxy`).
SIGINT and SIGTERM are passed on to CMD; when CMD ends the proxy stops, the summary goes to
stderr, and zep exits with CMD's status (128+N when CMD died of signal N, as shells report it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from zep import accesslog, jobenv
from zep.config import Settings
from zep.readyfile import Ready
from zep.serving import run_proxy
from zep.summary import Summary

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CANNOT_EXECUTE = 126  # what shells answer for a command that exists but cannot run
EXIT_NOT_FOUND = 127


def run(settings: Settings, command: Sequence[str]) -> int:
    """Serve for `command`'s lifetime, then print the summary (when the command got to run)."""
    summary = Summary()
    started = False

    async def job(ready: Ready) -> int:
        nonlocal started
        started = True
        environment = jobenv.job_environment(dict(os.environ), jobenv.variables(ready))
        return await run_command(command, environment)

    accesslog.subscribe(summary.observe)
    try:
        status = run_proxy(settings, job)
    finally:
        accesslog.unsubscribe(summary.observe)
    if started:
        sys.stderr.write(summary.render())
    return status


async def run_command(command: Sequence[str], environment: dict[str, str]) -> int:
    """Run `command` to its end with `environment`, passing on SIGINT/SIGTERM; its exit status."""
    try:
        process = await asyncio.create_subprocess_exec(*command, env=environment)
    except FileNotFoundError:
        print(f"zep: error: cannot run {command[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as exc:
        print(f"zep: error: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CANNOT_EXECUTE
    loop = asyncio.get_running_loop()
    for signum in FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, _forward, process, signum)
    try:
        status = await process.wait()
    finally:
        for signum in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signum)
    return 128 - status if status < 0 else status


def _forward(process: asyncio.subprocess.Process, signum: int) -> None:
    if process.returncode is None:
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass  # it has just ended
