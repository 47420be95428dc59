"""The process supervisor on its own (real child processes, quick restart delays), and the kernel
property its port reservation relies on."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.processes import wait_until
from tests.support.zepproc import zep_env
from zep.server import bind_socket

WAIT = 20.0


def test_a_reserved_port_takes_no_connections() -> None:
    """The kernel property the supervisor relies on: a bound SO_REUSEPORT socket that never listens
    is not in the port's group; every connection goes to the listening socket (none hangs)."""
    reservation = bind_socket("127.0.0.1", 0, "socks_port", reuse_port=True, listen=False)
    port = reservation.getsockname()[1]
    listener = bind_socket("127.0.0.1", port, "socks_port", reuse_port=True)
    try:
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                readable, _, _ = select.select([listener], [], [], 5)
                assert readable, "a connection was not given to the listening socket"
                listener.accept()[0].close()
    finally:
        listener.close()
        reservation.close()


def test_supervisor_restart_back_off_doubles_and_resets_once_stable(tmp_path: Path) -> None:
    """The generic supervisor, with quick delays: a worker that dies at once waits 0.05, 0.1, 0.2,
    0.2 s (capped); one that stays up longer than `stable_after` is always restarted after 0.05 s."""
    program = tmp_path / "supervise.py"
    program.write_text("""
import logging, sys
from zep.supervisor import RestartPolicy, Supervisor, WorkerSpec
logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")
policy = RestartPolicy(first_delay=0.05, max_delay=0.2, stable_after=0.2)
def spec(name, code):
    return WorkerSpec(name, "test", (sys.executable, "-c", code), {}, {}, policy)
sys.exit(Supervisor([spec("fast", "import sys; sys.exit(3)"),
                     spec("steady", "import sys, time; time.sleep(0.3); sys.exit(1)")],
                    on_all_ready=lambda workers: None, stop_timeout=5).run())
""")
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(program)], stderr=log_file, env=zep_env())
    try:
        def restarts(name: str) -> list[str]:
            return [line.rsplit(" in ", 1)[1] for line in log_path.read_text().splitlines()
                    if line.startswith(f"worker {name} ") and "restarting it in" in line]

        wait_until(lambda: len(restarts("fast")) >= 5 and len(restarts("steady")) >= 3, "restarts", WAIT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert restarts("fast")[:5] == ["0.05 s", "0.1 s", "0.2 s", "0.2 s", "0.2 s"]
    assert set(restarts("steady")) == {"0.05 s"}
    assert "worker fast (pid " in text and "exited with status 3 after" in text
