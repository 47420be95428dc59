"""The machinery of the benchmarks: the C load generator, the target servers, the systems under test
(direct loopback, zep with each relay, HAProxy, microsocks, zep over the Ziti stand-in), process
accounting from /proc, and round-robin interleaving.

Every system runs in its own process and the clients and servers in others, so the CPU time read
from /proc/<pid>/stat (utime + stime, all threads) is the proxy's alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.zepproc import ZepProcess, run_zep, start_zep, terminate

HERE = Path(__file__).resolve().parent
ZEPLOAD_SOURCE = HERE / "zepload.c"
GIB = 1 << 30
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def quick() -> bool:
    return os.environ.get("ZEP_BENCH_QUICK", "") not in ("", "0")


# ----------------------------------------------------------------------------------------- /proc

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_counts(pid: int) -> tuple[int, int]:
    """(all open fds, of which pipes) of a process."""
    total = pipes = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        total += 1
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("pipe:"):
                pipes += 1
        except FileNotFoundError:
            total -= 1
    return total, pipes


def raise_nofile() -> int:
    """Raise this process's soft fd limit to the hard one (children inherit it); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it listened on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


# ------------------------------------------------------------------------------ load generator

class ZepLoad:
    """The compiled load generator (zepload.c): clients and target servers."""

    def __init__(self, binary: Path, prefix: Sequence[str] = ()) -> None:
        self.binary = binary
        self.prefix = tuple(prefix)  # e.g. ("taskset", "-c", "0") for the clients
        self.server_pids: list[int] = []  # the processes of serve(), while they run

    def pinned(self, cpu: int) -> ZepLoad:
        """The same load generator whose clients run on `cpu` only."""
        twin = ZepLoad(self.binary, ("taskset", "-c", str(cpu)))
        twin.server_pids = self.server_pids
        return twin

    @classmethod
    def build(cls, directory: Path) -> ZepLoad:
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            raise RuntimeError(f"the load generator needs a C compiler: {cc!r} was not found (set CC)")
        binary = directory / "zepload"
        command = [cc, "-O2", "-Wall", "-pthread", "-o", str(binary), str(ZEPLOAD_SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling zepload failed:\n{' '.join(command)}\n{result.stderr}")
        return cls(binary)

    def run(self, *args: object, timeout: float = 600.0) -> list[str]:
        result = subprocess.run([*self.prefix, str(self.binary), *map(str, args)], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"zepload {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
        return result.stdout.split()

    @contextlib.contextmanager
    def serve(self) -> Iterator[dict[str, int]]:
        """The sink and echo servers in their own process: {"sink": port, "echo": port}."""
        proc = subprocess.Popen([str(self.binary), "serve"], stdout=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        self.server_pids.append(proc.pid)
        try:
            assert proc.stdout is not None
            ports = {}
            for _ in range(2):
                name, port = proc.stdout.readline().split()
                ports[name] = int(port)
            yield ports
        finally:
            self.server_pids.remove(proc.pid)
            terminate(proc)


# -------------------------------------------------------------------------------------- systems

@dataclass
class System:
    """One way for the clients to reach the servers."""

    name: str
    pid: int | None  # the proxy process whose CPU, memory and fds are measured; None for direct
    via: Callable[[str], str]  # target kind ("sink"/"echo") -> zepload VIA argument
    target: Callable[[str], str]  # target kind -> zepload TARGET argument
    socks: bool  # whether a connection includes a SOCKS5 handshake
    note: str = ""
    workers: Callable[[], Sequence[int]] = lambda: ()  # the pids of zep's workers (--workers), if any

    def pids(self) -> list[int]:
        """Every process of the proxy: the one started and, for zep with workers, each worker."""
        return [] if self.pid is None else [self.pid, *self.workers()]

    def cpu(self) -> float | None:
        """CPU seconds the proxy has used so far, all its processes together; None without a proxy."""
        pids = self.pids()
        return sum(cpu_seconds(pid) for pid in pids) if pids else None


@dataclass
class Lineup:
    """The systems of one workload, in their fixed order, and those that could not take part."""

    systems: list[System] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def rotations(self, rounds: int) -> Iterator[tuple[int, list[System]]]:
        """Round r runs the systems rotated by r (A B C, B C A, C A B, ...) so drift hits all alike."""
        n = len(self.systems)
        for r in range(rounds):
            k = r % n if n else 0
            yield r, self.systems[k:] + self.systems[:k]


ZEP_ARGS = ("--maxconn", "20000", "--log-level", "info")
# The harness lists zep's fds in /proc and profile.py attaches strace and py-spy: zep must stay
# dumpable for that (a variable, not a flag, so baseline builds without it still start).
ZEP_ENV = {"ZEP_DUMPABLE": "true"}
# The interpreter of another zep installation (e.g. the previous release in its own venv): when
# set, that zep joins every lineup, so a change is measured against its before in the same run.
BASELINE_VARIABLE = "ZEP_BENCH_BASELINE_PYTHON"
BASELINE_NAME = "zep baseline (cython)"


def compiled_relay_available() -> str | None:
    """None when `zep version` reports the compiled relay, else why not."""
    result = run_zep("version")
    if result.returncode != 0:
        return f"`zep version` failed: {result.stderr.strip()}"
    for line in result.stdout.splitlines():
        if line.startswith("relay:"):
            return None if line.split()[1] == "cython" else f"compiled relay not active: {line}"
    return "`zep version` did not name a relay"


def _zep_system(name: str, zp: ZepProcess, ports: dict[str, int], target_host: str | None = None) -> System:
    via = f"socks5:127.0.0.1:{zp.socks_port}"
    host = target_host
    return System(name, zp.proc.pid, lambda kind: via,
                  lambda kind: f"{host.format(kind=kind) if host else '127.0.0.1'}:{ports[kind]}", socks=True,
                  workers=lambda: tuple(zp.worker_pids().values()))


def pin(pids: Sequence[int], cpus: set[int]) -> None:
    """Pin every thread of these processes to `cpus` (what taskset -a does; later threads inherit it)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def haproxy(ports: dict[str, int], workdir: Path, maxconn: int) -> Iterator[System]:
    """HAProxy as a plain TCP forwarder with forced splicing, one frontend per target server."""
    fronts = {kind: free_port() for kind in ports}
    sections = "".join(
        f"\nlisten bench_{kind}\n    bind 127.0.0.1:{fronts[kind]}\n    server {kind} 127.0.0.1:{port}\n"
        for kind, port in ports.items())
    config = workdir / "haproxy.cfg"
    config.write_text(
        "global\n"
        f"    maxconn {maxconn}\n"
        "defaults\n"
        "    mode tcp\n"
        "    option splice-request\n"
        "    option splice-response\n"
        "    timeout connect 5s\n"
        "    timeout client 600s\n"
        "    timeout server 600s\n" + sections)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=open(workdir / "haproxy.log", "wb"), stderr=subprocess.STDOUT)
    try:
        for port in fronts.values():
            wait_listening(port, proc, "haproxy")
        yield System("haproxy (splice)", proc.pid, lambda kind: f"tcp:127.0.0.1:{fronts[kind]}",
                     lambda kind: f"127.0.0.1:{ports[kind]}", socks=False,
                     note="plain TCP forwarder: no SOCKS5 handshake")
    finally:
        terminate(proc)


@contextlib.contextmanager
def microsocks(ports: dict[str, int], workdir: Path) -> Iterator[System]:
    port = free_port()
    proc = subprocess.Popen(["microsocks", "-i", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                            stdout=open(workdir / "microsocks.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc, "microsocks")
        yield System("microsocks", proc.pid, lambda kind: f"socks5:127.0.0.1:{port}",
                     lambda kind: f"127.0.0.1:{ports[kind]}", socks=True)
    finally:
        terminate(proc)


def ziti_identity(path: Path, ports: dict[str, int]) -> Path:
    from tests.support.ziti import service, write_identity

    return write_identity(path, [service(f"bench-{kind}", [f"{kind}.bench.test"], [port], f"127.0.0.1:{port}")
                                 for kind, port in ports.items()])


@contextlib.contextmanager
def lineup(ports: dict[str, int], *, ziti_path: Path | None = None, ziti_skip: str | None = None,
           include_direct: bool = True, zep_workers: Sequence[int] = (1,)) -> Iterator[Lineup]:
    """Start every system that can run here; those that cannot are listed in `skipped` with why.

    `zep_workers`: the compiled-relay zep once per number of worker processes (1: one process)."""
    result = Lineup()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zep-bench-")))
        if include_direct:
            result.systems.append(System("direct", None, lambda kind: "direct",
                                         lambda kind: f"127.0.0.1:{ports[kind]}", socks=False,
                                         note="no proxy: the client's own ceiling"))
        why = compiled_relay_available()
        for workers in zep_workers:
            name = "zep (cython)" if workers == 1 else f"zep (cython, {workers} workers)"
            if why is not None:
                result.skipped[name] = why
                continue
            more = ("--workers", str(workers)) if workers > 1 else ()
            zp = stack.enter_context(start_zep("--direct", *ZEP_ARGS, *more, relay="cython", env=ZEP_ENV))
            zp.wait_for_log("relay=cython")
            system = _zep_system(name, zp, ports)
            if workers > 1:
                system.note = (f"{workers} worker processes sharing the port (SO_REUSEPORT) under a supervisor; "
                               "CPU is the sum over all of them")
            result.systems.append(system)
        zp = stack.enter_context(start_zep("--direct", *ZEP_ARGS, relay="python", env=ZEP_ENV))
        zp.wait_for_log("relay=python")
        result.systems.append(_zep_system("zep (python)", zp, ports))
        baseline = os.environ.get(BASELINE_VARIABLE)
        if baseline:
            zp = stack.enter_context(start_zep("--direct", *ZEP_ARGS, relay="cython", python=baseline,
                                               env=ZEP_ENV))
            zp.wait_for_log("relay=cython")
            system = _zep_system(BASELINE_NAME, zp, ports)
            system.note = f"another build of zep, run by {BASELINE_VARIABLE}: the before of a before/after"
            result.systems.append(system)
        if shutil.which("haproxy"):
            maxconn = max(256, min(20000, (raise_nofile() - 500) // 3))
            result.systems.append(stack.enter_context(haproxy(ports, workdir, maxconn)))
        else:
            result.skipped["haproxy (splice)"] = "haproxy is not installed (apt-get install haproxy)"
        if shutil.which("microsocks"):
            result.systems.append(stack.enter_context(microsocks(ports, workdir)))
        else:
            result.skipped["microsocks"] = "microsocks is not installed (apt-get install microsocks)"
        if ziti_path is not None:
            identity = ziti_identity(workdir / "bench-identity.json", ports)
            relay = "cython" if why is None else "python"
            zp = stack.enter_context(start_zep("--identity", str(identity), *ZEP_ARGS, relay=relay, env=ZEP_ENV,
                                               extra_pythonpath=[str(ziti_path)]))
            zp.wait_for_log("ziti ready")
            system = _zep_system("zep+ziti (stand-in)", zp, ports, target_host="{kind}.bench.test")
            system.note = (f"{relay} relay; the stand-in library's bridge thread (inside the zep process) "
                           "adds the same extra loopback hop as the real library")
            result.systems.append(system)
        elif ziti_skip is not None:
            result.skipped["zep+ziti (stand-in)"] = ziti_skip
        yield result


# -------------------------------------------------------------------------------------- results

def summarize(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median over rounds of each metric (keys present in every round)."""
    keys = [k for k in rounds[0] if all(k in r and r[k] is not None for r in rounds)]
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
