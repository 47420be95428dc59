"""The five workloads of issue 4, each measured for every system side by side in one run.

Each benchmark round runs every system once, rotated round by round (A B C, B C A, ...), so
machine drift hits all systems alike; pytest-benchmark's own timing is therefore the time of
one such round. The per-system figures (median over rounds, and every round) are in
`extra_info["systems"]`, which `benchmarks/report.py` turns into tables and a chart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.harness import GIB, MIB, Lineup, System, ZepLoad, fd_counts, lineup, pin, quick, rss_bytes, summarize

QUICK = quick()

BULK_BYTES = 256 * MIB if QUICK else GIB
BULK_ROUNDS = 2 if QUICK else 5
PARALLEL_STREAMS = 32
PARALLEL_BYTES = 4 * MIB if QUICK else 32 * MIB
PARALLEL_ROUNDS = 2 if QUICK else 5
PINGPONG_N = 2_000 if QUICK else 20_000
PINGPONG_SIZE = 64
PINGPONG_ROUNDS = 2 if QUICK else 5
RATE_CLIENTS = 16
RATE_SECONDS = 1.0 if QUICK else 3.0
RATE_SIZE = 100
RATE_ROUNDS = 2 if QUICK else 5
IDLE_TUNNELS = 500 if QUICK else 2_000
# One round: the RSS a process grows by the first time it holds N tunnels. A second round in the
# same process reuses the memory the first one freed and shows almost no growth.
IDLE_ROUNDS = 1

pytestmark = pytest.mark.timeout(3600)


def run_rounds(benchmark, lu: Lineup, rounds: int, measure: Callable[[System], dict],
               after_round: Callable[[dict[str, dict]], None] | None = None) -> dict[str, list[dict]]:
    """benchmark.pedantic over interleaved rounds; returns each system's list of per-round metrics."""
    per_system: dict[str, list[dict]] = {s.name: [] for s in lu.systems}
    rotations = lu.rotations(rounds)

    def one_round() -> None:
        _r, order = next(rotations)
        this_round = {}
        for system in order:
            this_round[system.name] = measure(system)
        if after_round is not None:
            after_round(this_round)
        for name, metrics in this_round.items():
            per_system[name].append(metrics)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return per_system


def record(benchmark, workload: str, title: str, lu: Lineup, per_system: dict[str, list[dict]],
           params: dict) -> None:
    benchmark.group = workload
    benchmark.extra_info.update({
        "workload": workload,
        "title": title,
        "quick": QUICK,
        "params": params,
        "order": [s.name for s in lu.systems],
        "systems": {s.name: {"metrics": summarize(per_system[s.name]), "rounds": per_system[s.name],
                             "note": s.note, "socks": s.socks} for s in lu.systems},
        "skipped": dict(lu.skipped),
    })


def ziti_args(ziti_package) -> dict:
    path, why = ziti_package
    return {"ziti_path": path, "ziti_skip": why}


# ------------------------------------------------------------------------------- 1 and 2: bulk

def measure_bulk(zepload: ZepLoad, system: System, streams: int, size: int) -> dict:
    cpu0 = system.cpu()
    seconds, total, errors = zepload.run("bulk", system.via("sink"), system.target("sink"), streams, size)
    cpu = system.cpu() - cpu0 if cpu0 is not None else None
    seconds, total = float(seconds), int(total)
    assert int(errors) == 0 and total == streams * size, f"{system.name}: {errors} failed streams"
    metrics = {"seconds": seconds, "mb_per_s": total / seconds / 1e6, "bytes": total}
    if cpu is not None:
        metrics.update(cpu_s=cpu, cpu_s_per_gib=cpu / (total / GIB))
    return metrics


def bulk_workload(benchmark, zepload, lu: Lineup, streams: int, size: int, rounds: int) -> dict[str, list[dict]]:
    for system in lu.systems:  # warm-up: first connections, imports, pipe pools
        zepload.run("bulk", system.via("sink"), system.target("sink"), min(streams, 4), 8 * MIB)
    return run_rounds(benchmark, lu, rounds, lambda s: measure_bulk(zepload, s, streams, size))


def test_1_one_stream(benchmark, zepload, servers, ziti_package) -> None:
    with lineup(servers, **ziti_args(ziti_package)) as lu:
        per_system = bulk_workload(benchmark, zepload, lu, 1, BULK_BYTES, BULK_ROUNDS)
    record(benchmark, "1-one-stream", f"One stream of {BULK_BYTES // MIB} MiB", lu, per_system,
           {"streams": 1, "bytes_per_stream": BULK_BYTES, "rounds": BULK_ROUNDS})


def test_2_parallel_streams(benchmark, zepload, servers) -> None:
    with lineup(servers) as lu:
        per_system = bulk_workload(benchmark, zepload, lu, PARALLEL_STREAMS, PARALLEL_BYTES, PARALLEL_ROUNDS)
    record(benchmark, "2-parallel-streams",
           f"{PARALLEL_STREAMS} parallel streams x {PARALLEL_BYTES // MIB} MiB", lu, per_system,
           {"streams": PARALLEL_STREAMS, "bytes_per_stream": PARALLEL_BYTES, "rounds": PARALLEL_ROUNDS})


# ------------------------------------------------------------------------------ 3: ping-pong

def measure_pingpong(zepload: ZepLoad, system: System) -> dict:
    out = zepload.run("pingpong", system.via("echo"), system.target("echo"), PINGPONG_N, PINGPONG_SIZE, 500)
    n, median, p90, p99, p999, mean, low, high = (int(float(v)) for v in out)
    return {"n": n, "median_us": median / 1e3, "p90_us": p90 / 1e3, "p99_us": p99 / 1e3,
            "p999_us": p999 / 1e3, "mean_us": mean / 1e3, "min_us": low / 1e3, "max_us": high / 1e3}


def added_over_direct(this_round: dict[str, dict]) -> None:
    direct = this_round.get("direct")
    for name, metrics in this_round.items():
        if direct is not None and name != "direct":
            metrics["added_median_us"] = metrics["median_us"] - direct["median_us"]
            metrics["added_p99_us"] = metrics["p99_us"] - direct["p99_us"]


def test_3_ping_pong(benchmark, zepload, servers, ziti_package) -> None:
    with lineup(servers, **ziti_args(ziti_package)) as lu:
        per_system = run_rounds(benchmark, lu, PINGPONG_ROUNDS, lambda s: measure_pingpong(zepload, s),
                                after_round=added_over_direct)
    record(benchmark, "3-ping-pong", f"{PINGPONG_N:,} ping-pong round trips of {PINGPONG_SIZE} bytes on one tunnel",
           lu, per_system, {"round_trips": PINGPONG_N, "size": PINGPONG_SIZE, "rounds": PINGPONG_ROUNDS})


# ------------------------------------------------------------------------ 4: connection rate

def measure_rate(zepload: ZepLoad, system: System, seconds: float) -> dict:
    cpu0 = system.cpu()
    done, errors, elapsed = zepload.run("connrate", system.via("echo"), system.target("echo"),
                                        RATE_CLIENTS, seconds, RATE_SIZE)
    cpu = system.cpu() - cpu0 if cpu0 is not None else None
    done, errors, elapsed = int(done), int(errors), float(elapsed)
    metrics = {"connections": done, "errors": errors, "seconds": elapsed, "conn_per_s": done / elapsed}
    if cpu is not None and done:
        metrics.update(cpu_s=cpu, cpu_us_per_conn=cpu / done * 1e6)
    return metrics


RATE_TITLE = f"Connection rate: {RATE_CLIENTS} clients, each SOCKS5 handshake + {RATE_SIZE} bytes echoed + close"
RATE_PARAMS = {"clients": RATE_CLIENTS, "seconds": RATE_SECONDS, "size": RATE_SIZE, "rounds": RATE_ROUNDS}


def rate_workload(benchmark, zepload: ZepLoad, lu: Lineup) -> dict[str, list[dict]]:
    for system in lu.systems:
        measure_rate(zepload, system, 0.3)  # warm-up
    return run_rounds(benchmark, lu, RATE_ROUNDS, lambda s: measure_rate(zepload, s, RATE_SECONDS))


def test_4_connection_rate(benchmark, zepload, servers) -> None:
    """zep with one process and with two workers, beside the others; all share the machine's CPUs."""
    with lineup(servers, zep_workers=(1, 2)) as lu:
        per_system = rate_workload(benchmark, zepload, lu)
    record(benchmark, "4-connection-rate", RATE_TITLE, lu, per_system, RATE_PARAMS)


def two_cpus() -> tuple[int, int]:
    """(CPU for the load generator and the servers, CPU for the proxy), or skip saying why not."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"pinning needs two CPUs; this process may use {len(cpus)}")
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed (util-linux)")
    return cpus[0], cpus[1]


def test_4_connection_rate_pinned(benchmark, zepload, servers) -> None:
    """Workload 4 with the clients and the servers on one CPU and every proxy on another, so each
    proxy's cost on a core of its own shows without the load generator competing for it."""
    load_cpu, proxy_cpu = two_cpus()
    every_cpu = os.sched_getaffinity(0)
    clients = zepload.pinned(load_cpu)
    pin(zepload.server_pids, {load_cpu})
    try:
        with lineup(servers) as lu:
            for system in lu.systems:
                pin(system.pids(), {proxy_cpu})
            per_system = rate_workload(benchmark, clients, lu)
    finally:
        pin(zepload.server_pids, every_cpu)
    record(benchmark, "4-connection-rate-pinned", f"{RATE_TITLE}; clients and servers on CPU {load_cpu}, "
           f"proxy on CPU {proxy_cpu}", lu, per_system, {**RATE_PARAMS, "load_cpu": load_cpu, "proxy_cpu": proxy_cpu})


# --------------------------------------------------------------------------- 5: idle tunnels

def wait_fds(pid: int, baseline: int, timeout: float = 15.0) -> tuple[int, float]:
    """Wait until the process is back to `baseline` fds; (fds now, seconds waited)."""
    start = time.monotonic()
    while True:
        fds, _pipes = fd_counts(pid)
        if fds <= baseline or time.monotonic() - start > timeout:
            return fds, time.monotonic() - start
        time.sleep(0.05)


def measure_idle(zepload: ZepLoad, system: System, n: int) -> dict:
    assert system.pid is not None
    time.sleep(0.3)  # let the previous round's closes settle
    fds0, pipes0 = fd_counts(system.pid)
    rss0 = rss_bytes(system.pid)
    client = subprocess.Popen([str(zepload.binary), "idle", system.via("echo"), system.target("echo"), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        line = client.stdout.readline()
        assert line.startswith("ready"), f"{system.name}: idle client failed: {client.stderr.read() if client.stderr else ''}"
        time.sleep(1.0)  # idle: nothing moves
        fds1, pipes1 = fd_counts(system.pid)
        rss1 = rss_bytes(system.pid)
        client.stdin.write("close\n")
        client.stdin.flush()
        assert client.stdout.readline().startswith("closed")
    finally:
        client.wait(30)
    fds2, waited = wait_fds(system.pid, fds0)
    return {"tunnels": n, "rss_base_mib": rss0 / MIB, "rss_idle_kib": rss1 / 1024,
            "rss_kib_per_tunnel": (rss1 - rss0) / 1024 / n, "fds_per_tunnel": (fds1 - fds0) / n,
            "pipe_fds_idle": pipes1 - pipes0, "pipe_fds_base": pipes0,
            "fds_base": fds0, "fds_after_close": fds2, "fds_leaked": fds2 - fds0, "seconds_to_baseline": waited}


def test_5_idle_tunnels(benchmark, zepload, servers) -> None:
    with lineup(servers, include_direct=False) as lu:
        for system in lu.systems:
            measure_idle(zepload, system, 50)  # warm-up: first connections, lazily built state
        per_system = run_rounds(benchmark, lu, IDLE_ROUNDS, lambda s: measure_idle(zepload, s, IDLE_TUNNELS))
    record(benchmark, "5-idle-tunnels", f"{IDLE_TUNNELS:,} idle tunnels", lu, per_system,
           {"tunnels": IDLE_TUNNELS, "rounds": IDLE_ROUNDS})


def test_report_renders(tmp_path: Path) -> None:
    """report.py turns a results file into Markdown and a PNG (smoke test on a tiny synthetic run)."""
    import json

    from benchmarks import report

    results = {"benchmarks": [{"group": "1-one-stream", "name": "test_1_one_stream", "extra_info": {
        "workload": "1-one-stream", "title": "One stream", "quick": True, "params": {},
        "order": ["direct", "zep (cython)", "zep (python)"], "skipped": {"microsocks": "not installed"},
        "systems": {
            "direct": {"metrics": {"mb_per_s": 4000.0}, "note": "", "socks": False},
            "zep (cython)": {"metrics": {"mb_per_s": 3000.0, "cpu_s_per_gib": 0.3}, "note": "", "socks": True},
            "zep (python)": {"metrics": {"mb_per_s": 900.0, "cpu_s_per_gib": 1.2}, "note": "", "socks": True},
        }}}], "datetime": "2000-01-01T00:00:00", "machine_info": {}}
    source = tmp_path / "results.json"
    source.write_text(json.dumps(results))
    assert report.main([str(source), "--markdown", str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "zep (cython)" in text and "microsocks" in text and "not installed" in text
    assert (tmp_path / "r.png").stat().st_size > 0



def test_two_worker_target_is_two_cores_of_cpu_against_one_pinned_worker() -> None:
    """The 2-worker target: two cores' worth of proxy CPU at the CPU per connection two workers
    spent (all CPUs shared), against what one worker did with a core to itself."""
    from benchmarks import report

    def rate(systems: dict[str, dict]) -> dict:
        return {"systems": {name: {"metrics": metrics} for name, metrics in systems.items()}}

    workloads = {
        "4-connection-rate": rate({report.CYTHON_2: {"conn_per_s": 9000.0, "cpu_us_per_conn": 200.0}}),
        "4-connection-rate-pinned": rate({report.CYTHON: {"conn_per_s": 5000.0, "cpu_us_per_conn": 190.0}}),
    }
    target, = [t for t in report.targets(workloads) if t.text.startswith("2 workers")]
    assert target.value == pytest.approx(2e6 / 200.0 / 5000.0) and target.status == "met"
    assert "10,000 (2 s / 200 us) vs 5,000 conn/s" == target.figures
