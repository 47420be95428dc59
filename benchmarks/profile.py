"""Where a zep process spends its time under one benchmark workload.

    python benchmarks/profile.py connrate --relay cython
    python benchmarks/profile.py pingpong --relay python

Starts the sink/echo servers and one `zep serve`, warms up, then runs the workload three times:
once plain (the figure), once under `strace -c -f` (system calls per connection or per round
trip) and once under `py-spy record` (Python stacks of the event loop, grouped by what they do).
strace and py-spy are used when installed; the proxy's user and system CPU come from /proc.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from benchmarks.harness import CLK_TCK, ZEP_ARGS, ZEP_ENV, ZepLoad, raise_nofile  # noqa: E402
from tests.support.zepproc import start_zep  # noqa: E402

# py-spy frames -> what the event loop is doing. A sample counts for the category of its innermost
# frame that names one, so work an exchange does inside a dial callback counts as the exchange's.
CATEGORIES = [
    ("access log", ("AccessRecord.emit", "accesslog.py", "logging/")),
    ("relay hand-off", ("FastConnection._tunnel", "FastConnection._relayed", "_relay.pyx", "_relay_py.py",
                        "Driver._tunnel")),
    ("upstream dial", ("FastConnection._dial", "FastConnection._connect", "dial.py", "routing.py")),
    ("SOCKS5 handshake", ("socks_exchange.py", "socks5.py", "exchange.py", "FastConnection.", "driver.py")),
    ("accept", ("_accept_all",)),
]


def user_sys(pid: int, tid: int | None = None) -> tuple[float, float]:
    """Seconds of user and system CPU of a process (or of one of its threads)."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def threads(pid: int) -> dict[int, tuple[float, float]]:
    return {int(tid): user_sys(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def categorize(raw: Path) -> list[tuple[str, float]]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        name = next((c for frame in reversed(frames) for c, needles in CATEGORIES if any(x in frame for x in needles)),
                    None)
        if name is None:
            name = "event loop itself (uvloop, callbacks)" if stack.endswith("(asyncio/runners.py:118)") else "other"
        counts[name] += int(n)
    total = sum(counts.values()) or 1
    return [(name, c / total) for name, c in counts.most_common()]


def innermost(raw: Path) -> list[tuple[str, float]]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack.rsplit(";", 1)[-1]] += int(n)
    total = sum(counts.values()) or 1
    return [(frame, c / total) for frame, c in counts.most_common()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["connrate", "pingpong", "bulk"])
    parser.add_argument("--relay", choices=["cython", "python"], default="cython")
    parser.add_argument("--seconds", type=float, default=5.0, help="connrate duration")
    parser.add_argument("--top", type=int, default=0, metavar="N", help="also list the N busiest innermost frames")
    args = parser.parse_args()
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="zep-profile-") as tmp:
        zepload = ZepLoad.build(Path(tmp))
        with zepload.serve() as ports, start_zep("--direct", *ZEP_ARGS, relay=args.relay, env=ZEP_ENV) as zp:
            pid, via = zp.proc.pid, f"socks5:127.0.0.1:{zp.socks_port}"
            target = f"127.0.0.1:{ports['sink' if args.workload == 'bulk' else 'echo']}"
            command = {"connrate": ["connrate", via, target, 16, args.seconds, 100],
                       "pingpong": ["pingpong", via, target, 20000, 64, 500],
                       "bulk": ["bulk", via, target, 1, 1 << 30]}[args.workload]

            def run() -> tuple[list[str], int]:
                out = zepload.run(*command)
                units = int(out[0]) if args.workload != "bulk" else 1
                return out, units

            zepload.run(*command[:3], *([16, 0.5, 100] if args.workload == "connrate" else command[3:]))
            (u0, s0), t0 = user_sys(pid), threads(pid)
            out, units = run()
            (u1, s1), t1 = user_sys(pid), threads(pid)
            per = {"connrate": "connection", "pingpong": "round trip", "bulk": "GiB"}[args.workload]
            print(f"zep ({args.relay}) {args.workload}: zepload says {' '.join(out)}")
            print(f"  proxy CPU per {per}: user {(u1 - u0) / units * 1e6:,.0f} us, system {(s1 - s0) / units * 1e6:,.0f} us")
            # The main thread is the event loop (its id is the pid); the others: the relay engine's, the SDK's
            for tid, (tu1, ts1) in sorted(t1.items()):
                tu0, ts0 = t0.get(tid, (0.0, 0.0))
                if (tu1 - tu0) + (ts1 - ts0) > 0:
                    name = "event loop" if tid == pid else f"thread {tid}"
                    print(f"    {name}: user {(tu1 - tu0) / units * 1e6:,.0f} us, system {(ts1 - ts0) / units * 1e6:,.0f} us")
            if shutil.which("strace"):
                log = Path(tmp, "strace.txt")
                tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(log)],
                                          stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                _out, units = run()
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
                print(f"  system calls per {per} (under strace, {units:,} {per}s):")
                for line in log.read_text().splitlines()[2:14]:
                    parts = line.split()
                    if len(parts) >= 5 and parts[3].isdigit():
                        errors = f" ({int(parts[4]) / units:.2f} failed)" if len(parts) == 6 else ""
                        print(f"    {parts[-1]:<14} {int(parts[3]) / units:6.2f}{errors}")
            if shutil.which("py-spy"):
                raw = Path(tmp, "py-spy.txt")
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "500", "--nonblocking",
                                        "--format", "raw", "--output", str(raw), "--duration",
                                        str(int(args.seconds) + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                run()
                spy.wait()
                if raw.exists():
                    print("  event-loop thread (py-spy samples):")
                    for name, share in categorize(raw):
                        print(f"    {share:6.1%}  {name}")
                    if args.top:
                        print("  busiest innermost frames (py-spy samples):")
                        for frame, share in innermost(raw)[:args.top]:
                            print(f"    {share:6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
