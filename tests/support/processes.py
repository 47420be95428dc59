"""Processes seen from outside, through /proc (Linux): the ports a process listens on, which
process holds one end of a connection, whether a process is gone; and a bounded wait for any of it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

LISTEN = 0x0A


@dataclass(frozen=True)
class TCPSocket:
    local_port: int
    remote_port: int
    state: int
    inode: int


def tcp_sockets() -> list[TCPSocket]:
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                sockets.append(TCPSocket(int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                                         int(state, 16), int(inode)))
    return sockets


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_ports(pid: int) -> set[int]:
    mine = socket_inodes(pid)
    return {s.local_port for s in tcp_sockets() if s.state == LISTEN and s.inode in mine}


def holder_of_connection(pids: list[int], local_port: int, remote_port: int) -> int:
    """The one process among `pids` holding the socket of local_port <- remote_port."""
    inodes = {s.inode for s in tcp_sockets()
              if s.local_port == local_port and s.remote_port == remote_port and s.state != LISTEN}
    holders = [pid for pid in pids if socket_inodes(pid) & inodes]
    assert len(holders) == 1, f"connection :{remote_port} -> :{local_port} held by {holders} of {pids}"
    return holders[0]


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(condition: Callable[[], T], what: str, timeout: float) -> T:
    """Poll `condition` until it returns something true, which is returned; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")
