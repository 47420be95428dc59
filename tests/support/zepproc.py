"""Run a real `zep serve` in a subprocess on ports chosen by the OS, and read its log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 30.0


@dataclass
class ZepProcess:
    proc: subprocess.Popen
    log_path: Path
    ready_path: Path
    socks_port: int | None = None  # the ports are known once ready (see wait_ready)
    http_port: int | None = None
    admin_port: int | None = None
    final_log: str | None = None  # kept once the process is gone and its directory removed

    def wait_ready(self) -> None:
        """Wait for the ready file and take the listening ports from it."""
        info = _wait_ready(self.proc, self.ready_path, self.log_path)
        self.socks_port, self.http_port, self.admin_port = (
            _port(info.get("socks5")), _port(info.get("http")), _port(info.get("admin")))

    def ready_info(self) -> dict:
        """The ready file as it is now (with --workers, rewritten when a restarted worker is ready)."""
        return json.loads(self.ready_path.read_text())

    def worker_pids(self) -> dict[str, int]:
        """Worker id -> pid, from the ready file; empty for a single process."""
        return {w["id"]: w["pid"] for w in self.ready_info().get("workers", [])}

    def log_text(self) -> str:
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        """The lines written so far, whole: a line zep is still writing is not one yet."""
        text = self.log_text()
        if self.final_log is None:
            text = text[:text.rfind("\n") + 1]
        return text.splitlines()

    def access_lines(self) -> list[str]:
        return [line for line in self.log_lines() if " zep.access: " in line]

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until a log line contains `needle` (access lines are written when a connection ends)."""
        return self.wait_for_lines(needle, 1, timeout)[0]

    def client_mark(self, sock: socket.socket) -> tuple[str, int]:
        """Taken right after connecting: the port of `sock` may have served an earlier connection
        of a long-running zep, so `wait_for_client` skips the lines it had then."""
        client = f"client=127.0.0.1:{sock.getsockname()[1]} "
        return client, sum(client in line for line in self.log_lines())

    def wait_for_client(self, mark: tuple[str, int], timeout: float = 10.0) -> str:
        """The access line of the connection `mark` was taken for."""
        client, earlier = mark
        return self.wait_for_lines(client, earlier + 1, timeout)[-1]

    def wait_for_lines(self, needle: str, count: int, timeout: float = 10.0) -> list[str]:
        """Wait until `count` log lines contain `needle`; returns them in order."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.log_lines() if needle in line]
            if len(lines) >= count:
                return lines
            time.sleep(0.02)
        raise AssertionError(f"not {count} log lines with {needle!r} within {timeout} s; log:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


# Who runs SOCKS5 and HTTP CONNECT connections: the relay engine (SOCKS5 only, with the compiled
# relay; the fast path carries what it gives back), loop callbacks, or a coroutine per connection.
DRIVER_ENVIRONMENT = {
    "native": {"ZEP_FAST_PATH": "on", "ZEP_NATIVE_SOCKS": "on"},
    "fast": {"ZEP_FAST_PATH": "on", "ZEP_NATIVE_SOCKS": "off"},
    "coroutine": {"ZEP_FAST_PATH": "off"},
}
DRIVER_LOG = {"native": "socks5 handshakes: in the relay engine", "fast": "socks5 handshakes: in Python",
              "coroutine": "socks5 handshakes: in Python"}


def zep_env(env: Mapping[str, str] | None = None, relay: str | None = None,
            extra_pythonpath: Sequence[str] = (), driver: str | None = None) -> dict[str, str]:
    """The environment a zep subprocess runs with: no proxy variables leak in, no auth unless asked."""
    base = {k: v for k, v in os.environ.items()
            if k.upper() not in {"ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ZITI_IDENTITIES", "ZITI_IDENTITY"}
            and not k.startswith(("PROXY_", "ZEP_", "SOCKS_", "HTTP_"))}
    base.update(PROXY_USERNAME="", PROXY_PASSWORD="")
    if relay == "python":
        base["ZEP_NO_EXTENSIONS"] = "1"
    if driver is not None:
        base.update(DRIVER_ENVIRONMENT[driver])
    if extra_pythonpath:
        base["PYTHONPATH"] = os.pathsep.join([*extra_pythonpath, base.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    base.update(env or {})
    return base


@contextlib.contextmanager
def start_zep(*args: str, env: Mapping[str, str] | None = None, relay: str | None = None,
              extra_pythonpath: Sequence[str] = (), default_args: bool = True,
              python: str = sys.executable, ready_path: Path | None = None,
              preexec_fn: Callable[[], None] | None = None, wait_ready: bool = True,
              driver: str | None = None) -> Iterator[ZepProcess]:
    """Start `python -m zep serve` and wait until it is listening (its ready file); stop it on exit.

    `python` may name another environment's interpreter (the benchmarks' baseline build);
    `preexec_fn` runs in the child before zep starts (to lower a resource limit, say). With
    `wait_ready=False` the caller watches it start and calls `wait_ready()` itself. `driver`
    (one of DRIVER_ENVIRONMENT) says who runs SOCKS5 and CONNECT; zep is checked to say so."""
    with tempfile.TemporaryDirectory(prefix="zep-test-") as tmp:
        ready = ready_path or Path(tmp, "ready.json")
        log_path = Path(tmp, "zep.log")
        command = [python, "-m", "zep", "serve"]
        if default_args:
            command += ["--host", "127.0.0.1", "--socks-port", "0", "--http-port", "0"]
        command += [*args, "--ready-file", str(ready)]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(command, env=zep_env(env, relay, extra_pythonpath, driver),
                                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=preexec_fn)
        zp = ZepProcess(proc, log_path, ready)
        try:
            if wait_ready:
                zp.wait_ready()
                if driver is not None and "--no-socks" not in args:
                    zp.wait_for_log(DRIVER_LOG[driver])
            yield zp
        finally:
            terminate(proc)
            zp.final_log = log_path.read_text(errors="replace")


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process is still there after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_zep(*args: str, env: Mapping[str, str] | None = None, extra_pythonpath: Sequence[str] = (),
            timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run `python -m zep ARGS` to completion (for start-up errors and `zep version`)."""
    return subprocess.run([sys.executable, "-m", "zep", *args], env=zep_env(env, None, extra_pythonpath),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `zep: error:` line of a run that exited 2 (log lines may come before it)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("zep: error: ")]
    assert errors == lines[-1:], result.stderr  # one error line, the last (log lines may come before)
    return lines[-1]


def _wait_ready(proc: subprocess.Popen, ready: Path, log_path: Path) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        info = _ready_info(ready, proc.pid)
        if info is not None:
            return info
        if proc.poll() is not None:
            raise RuntimeError(f"zep exited with {proc.returncode} before it was ready:\n{log_path.read_text()}")
        time.sleep(0.02)
    raise RuntimeError(f"zep was not ready within {READY_TIMEOUT} s:\n{log_path.read_text()}")


def _ready_info(ready: Path, pid: int) -> dict | None:
    """The ready file once `pid` wrote it (it may hold a stale one from another zep before)."""
    try:
        info = json.loads(ready.read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("pid") == pid else None


def _port(address: str | None) -> int | None:
    return int(address.rsplit(":", 1)[1]) if address else None
