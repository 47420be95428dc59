"""Turn the benchmark suite's pytest-benchmark JSON into a Markdown report and a PNG chart.

    python benchmarks/report.py results.json --markdown report.md --png report.png

One table per workload (systems as rows; figures are medians over the interleaved rounds, with
ratios against direct loopback and against the baselines the targets name), then the targets of
issue 4, each marked met or missed with the figures behind it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CYTHON, PYTHON, HAPROXY, MICROSOCKS, DIRECT, ZITI = (
    "zep (cython)", "zep (python)", "haproxy (splice)", "microsocks", "direct", "zep+ziti (stand-in)")
CYTHON_2 = "zep (cython, 2 workers)"


@dataclass(frozen=True)
class Column:
    header: str
    metric: str
    fmt: str = "{:,.0f}"
    vs: str | None = None  # a ratio of `metric` against this system's
    spread: bool = False  # the lowest and highest value over the rounds instead of the median


BULK = [
    Column("MB/s", "mb_per_s"),
    Column("MB/s rounds", "mb_per_s", "{:,.0f}", spread=True),
    Column("x direct", "mb_per_s", "{:.2f}", DIRECT),
    Column("x haproxy", "mb_per_s", "{:.2f}", HAPROXY),
    Column("x python relay", "mb_per_s", "{:.2f}", PYTHON),
    Column("CPU s/GiB", "cpu_s_per_gib", "{:.3f}"),
    Column("CPU x haproxy", "cpu_s_per_gib", "{:.2f}", HAPROXY),
    Column("CPU x python relay", "cpu_s_per_gib", "{:.2f}", PYTHON),
]
RATE = [
    Column("conn/s", "conn_per_s"),
    Column("conn/s rounds", "conn_per_s", "{:,.0f}", spread=True),
    Column("x direct", "conn_per_s", "{:.2f}", DIRECT),
    Column("x microsocks", "conn_per_s", "{:.2f}", MICROSOCKS),
    Column("x python relay", "conn_per_s", "{:.2f}", PYTHON),
    Column("x zep 1 process", "conn_per_s", "{:.2f}", CYTHON),
    Column("proxy CPU us/conn", "cpu_us_per_conn", "{:.0f}"),
    Column("CPU x microsocks", "cpu_us_per_conn", "{:.2f}", MICROSOCKS),
    Column("errors", "errors", "{:.0f}"),
]
TABLES: dict[str, list[Column]] = {
    "1-one-stream": BULK,
    "2-parallel-streams": BULK,
    "3-ping-pong": [
        Column("median us", "median_us", "{:.1f}"),
        Column("p99 us", "p99_us", "{:.1f}"),
        Column("added median us", "added_median_us", "{:.1f}"),
        Column("added p99 us", "added_p99_us", "{:.1f}"),
        Column("added median rounds", "added_median_us", "{:.0f}", spread=True),
        Column("added median x python relay", "added_median_us", "{:.2f}", PYTHON),
        Column("added median x haproxy", "added_median_us", "{:.2f}", HAPROXY),
        Column("added p99 x python relay", "added_p99_us", "{:.2f}", PYTHON),
        Column("added p99 x haproxy", "added_p99_us", "{:.2f}", HAPROXY),
    ],
    "4-connection-rate": RATE,
    "4-connection-rate-pinned": RATE,
    "5-idle-tunnels": [
        Column("tunnels", "tunnels", "{:,.0f}"),
        Column("RSS KiB/tunnel", "rss_kib_per_tunnel", "{:.2f}"),
        Column("x haproxy", "rss_kib_per_tunnel", "{:.2f}", HAPROXY),
        Column("fds/tunnel", "fds_per_tunnel", "{:.2f}"),
        Column("pipe fds held idle", "pipe_fds_idle", "{:+.0f}"),
        Column("fds left after close", "fds_leaked", "{:+.0f}"),
        Column("s to fd baseline", "seconds_to_baseline", "{:.2f}"),
        Column("RSS base MiB", "rss_base_mib", "{:.1f}"),
    ],
}
NOTES = {
    "1-one-stream": "MB/s = 10^6 bytes/s, client to sink, wall clock from connected to the sink's byte count. "
                    "CPU = the proxy process's utime+stime (all threads) from /proc/<pid>/stat.",
    "2-parallel-streams": "Aggregate MB/s over all streams; CPU as in workload 1.",
    "3-ping-pong": "Round-trip latency of 64-byte messages on one tunnel; added = system minus direct, "
                   "per round, then the median over rounds (so added p99 can be below added median).",
    "4-connection-rate": "Each connection: TCP connect, SOCKS5 handshake (no auth) and CONNECT, 100 bytes echoed, "
                         "close. HAProxy is not a SOCKS server: its row is a plain TCP connect + 100 bytes echoed, "
                         "and direct is the same without any proxy. Proxy CPU = utime+stime of all the system's "
                         "processes (zep with workers: the supervisor and every worker) per connection. "
                         "Clients, servers and proxies share all CPUs.",
    "4-connection-rate-pinned": "As workload 4, with the load generator's clients and the target servers pinned to "
                                "one CPU and every thread of each proxy to another (taskset, sched_setaffinity): "
                                "what one core of proxy does, without the load generator taking a share of it.",
    "5-idle-tunnels": "Each tunnel: handshake, 1 byte echoed, then idle. Per tunnel = (idle - baseline) / tunnels; "
                      "pipe fds held idle = the proxy's pipe fds while idle minus before; fds left = after close "
                      "minus before.",
}


def load(path: Path) -> tuple[dict, dict[str, dict]]:
    data = json.loads(path.read_text())
    workloads = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "workload" in info and "systems" in info:
            workloads[info["workload"]] = info
    return data, dict(sorted(workloads.items()))


def metric(info: dict, system: str, name: str) -> float | None:
    value = info["systems"].get(system, {}).get("metrics", {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def spread(info: dict, system: str, name: str, spec: str) -> str:
    values = [r[name] for r in info["systems"].get(system, {}).get("rounds", []) if r.get(name) is not None]
    if len(values) < 2:
        return "-"
    return f"{spec.format(min(values))}-{spec.format(max(values))}"


def ratio(info: dict, system: str, name: str, vs: str) -> float | None:
    a, b = metric(info, system, name), metric(info, vs, name)
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    workload: str
    text: str
    value: float | None
    limit: float
    at_least: bool  # value must be >= limit (else <=)
    figures: str

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        return "met" if (self.value >= self.limit if self.at_least else self.value <= self.limit) else "missed"

    @property
    def by(self) -> str:
        if self.status != "missed" or self.value is None or self.limit == 0:
            return ""
        return f"by {abs(self.value - self.limit) / abs(self.limit):.0%}"


def fmt(value: float | None, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def targets(workloads: dict[str, dict]) -> list[Target]:
    out: list[Target] = []

    def add(workload: str, text: str, value: float | None, limit: float, at_least: bool, figures: str) -> None:
        out.append(Target(workload, text, value, limit, at_least, figures))

    for key in ("1-one-stream", "2-parallel-streams"):
        info = workloads.get(key)
        if not info:
            continue
        c, h, p = (metric(info, s, "mb_per_s") for s in (CYTHON, HAPROXY, PYTHON))
        cc, ch, cp = (metric(info, s, "cpu_s_per_gib") for s in (CYTHON, HAPROXY, PYTHON))
        add(key, "throughput >= 1.0 x haproxy", ratio(info, CYTHON, "mb_per_s", HAPROXY), 1.0, True,
            f"{fmt(c, '{:,.0f}')} vs {fmt(h, '{:,.0f}')} MB/s")
        add(key, "CPU s/GiB <= 0.9 x haproxy", ratio(info, CYTHON, "cpu_s_per_gib", HAPROXY), 0.9, False,
            f"{fmt(cc, '{:.3f}')} vs {fmt(ch, '{:.3f}')} s/GiB")
        add(key, "CPU s/GiB <= 0.5 x python relay", ratio(info, CYTHON, "cpu_s_per_gib", PYTHON), 0.5, False,
            f"{fmt(cc, '{:.3f}')} vs {fmt(cp, '{:.3f}')} s/GiB")
    info = workloads.get("3-ping-pong")
    if info:
        for name, label in (("added_median_us", "median"), ("added_p99_us", "p99")):
            c, p, h = (metric(info, s, name) for s in (CYTHON, PYTHON, HAPROXY))
            add("3-ping-pong", f"added {label} latency <= 0.7 x python relay", ratio(info, CYTHON, name, PYTHON),
                0.7, False, f"{fmt(c, '{:.1f}')} vs {fmt(p, '{:.1f}')} us")
            add("3-ping-pong", f"added {label} latency <= 1.0 x haproxy", ratio(info, CYTHON, name, HAPROXY),
                1.0, False, f"{fmt(c, '{:.1f}')} vs {fmt(h, '{:.1f}')} us")
    info = workloads.get("4-connection-rate")
    if info:
        c, m, p = (metric(info, s, "conn_per_s") for s in (CYTHON, MICROSOCKS, PYTHON))
        add("4-connection-rate", "conn/s >= 1.0 x microsocks", ratio(info, CYTHON, "conn_per_s", MICROSOCKS), 1.0,
            True, f"{fmt(c, '{:,.0f}')} vs {fmt(m, '{:,.0f}')} conn/s")
        add("4-connection-rate", "conn/s >= 1.2 x python relay", ratio(info, CYTHON, "conn_per_s", PYTHON), 1.2,
            True, f"{fmt(c, '{:,.0f}')} vs {fmt(p, '{:,.0f}')} conn/s")
    for key in ("4-connection-rate", "4-connection-rate-pinned"):
        info = workloads.get(key)
        if info:
            cc, cm = (metric(info, s, "cpu_us_per_conn") for s in (CYTHON, MICROSOCKS))
            add(key, "proxy CPU per connection <= 1.0 x microsocks",
                ratio(info, CYTHON, "cpu_us_per_conn", MICROSOCKS), 1.0, False,
                f"{fmt(cc, '{:.0f}')} vs {fmt(cm, '{:.0f}')} us/conn")
    shared, pinned = workloads.get("4-connection-rate"), workloads.get("4-connection-rate-pinned")
    if shared and pinned:
        # Two workers cannot have two cores to themselves on a two-core machine (the load generator
        # needs one): their capacity is what two cores of proxy CPU buy at the CPU per connection
        # they spent with all CPUs shared, beside what one worker did with a core to itself.
        cpu2, one = metric(shared, CYTHON_2, "cpu_us_per_conn"), metric(pinned, CYTHON, "conn_per_s")
        capacity = 2e6 / cpu2 if cpu2 else None
        add("4-connection-rate", "2 workers: conn/s of 2 cores (2 s / CPU per conn) >= 1.5 x 1 worker pinned",
            capacity / one if capacity and one else None, 1.5, True,
            f"{fmt(capacity, '{:,.0f}')} (2 s / {fmt(cpu2, '{:.0f}')} us) vs {fmt(one, '{:,.0f}')} conn/s")
    info = workloads.get("5-idle-tunnels")
    if info:
        n = metric(info, CYTHON, "tunnels")
        rss = metric(info, CYTHON, "rss_kib_per_tunnel")
        add("5-idle-tunnels", "<= 8 KiB RSS per idle tunnel", rss, 8.0, False,
            f"{fmt(rss)} KiB/tunnel at {fmt(n, '{:,.0f}')} tunnels")
        pipes = metric(info, CYTHON, "pipe_fds_idle")
        add("5-idle-tunnels", "no pipe held by an idle tunnel", pipes, 0.0, False,
            f"{fmt(pipes, '{:+.0f}')} pipe fds while idle")
        leaked = metric(info, CYTHON, "fds_leaked")
        add("5-idle-tunnels", "fds back to baseline after close", leaked, 0.0, False,
            f"{fmt(leaked, '{:+.0f}')} fds after close")
    return out


# --------------------------------------------------------------------------------------- markdown

def systems_of(info: dict) -> list[str]:
    return [s for s in info.get("order", info["systems"]) if s in info["systems"]]


def markdown(data: dict, workloads: dict[str, dict]) -> str:
    lines = ["# zep benchmarks", ""]
    any_info = next(iter(workloads.values()), {})
    mode = "quick (ZEP_BENCH_QUICK=1)" if any_info.get("quick") else "full"
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}) if isinstance(machine.get("cpu"), dict) else {}
    lines.append(f"Run: {data.get('datetime', '?')}, {mode} mode; "
                 f"{cpu.get('count', '?')} CPUs ({cpu.get('brand_raw', 'unknown CPU')}), "
                 f"Python {machine.get('python_version', '?')}. Figures are medians over rounds in which the "
                 "systems took turns (rotated each round); the \"rounds\" columns give the lowest and highest round.")
    lines.append("")
    skipped: dict[str, str] = {}
    for info in workloads.values():
        skipped.update(info.get("skipped", {}))
    if skipped:
        lines.append("Systems not measured: " + "; ".join(f"**{k}**: {v}" for k, v in sorted(skipped.items())) + ".")
        lines.append("")
    for key, info in workloads.items():
        columns = TABLES.get(key)
        if columns is None:
            continue
        lines += [f"## {info.get('title', key)}", "", NOTES.get(key, ""), ""]
        lines.append("| system | " + " | ".join(c.header for c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for system in systems_of(info):
            cells = []
            for c in columns:
                if c.spread:
                    cells.append(spread(info, system, c.metric, c.fmt))
                    continue
                if c.vs is None:
                    value = metric(info, system, c.metric)
                else:
                    value = None if system == c.vs else ratio(info, system, c.metric, c.vs)
                cells.append(fmt(value, c.fmt))
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
        for system, why in info.get("skipped", {}).items():
            lines.append(f"| {system} | " + " | ".join(["skipped"] + [""] * (len(columns) - 1)) + " |")
        notes = [f"{s}: {info['systems'][s]['note']}" for s in systems_of(info) if info["systems"][s].get("note")]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    found = targets(workloads)
    if found:
        lines += ["## Targets (issue 4): zep (cython)", "", "| workload | target | value | status | figures |",
                  "|---|---|---:|---|---|"]
        for t in found:
            status = t.status + (f" ({t.by})" if t.by else "")
            lines.append(f"| {t.workload} | {t.text} | {fmt(t.value)} | {status} | {t.figures} |")
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- png

def chart(workloads: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, Sequence[tuple[str, str]], str]] = [
        ("1-one-stream", "1: one stream, MB/s (higher is better)", [("mb_per_s", "MB/s")], "{:,.0f}"),
        ("2-parallel-streams", "2: 32 streams, aggregate MB/s (higher is better)", [("mb_per_s", "MB/s")], "{:,.0f}"),
        ("bulk-cpu", "1 and 2: proxy CPU s/GiB (lower is better)", [], "{:.2f}"),
        ("3-ping-pong", "3: added latency over direct, us (lower is better)",
         [("added_median_us", "median"), ("added_p99_us", "p99")], "{:.0f}"),
        ("4-connection-rate", "4: connections/s (higher is better)", [("conn_per_s", "conn/s")], "{:,.0f}"),
        ("5-idle-tunnels", "5: RSS KiB per idle tunnel (lower is better)", [("rss_kib_per_tunnel", "KiB")], "{:.1f}"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    mode = "quick" if next(iter(workloads.values()), {}).get("quick") else "full"
    fig.suptitle(f"zep benchmarks ({mode} mode): direct loopback, zep relays, HAProxy, microsocks", fontsize=14)
    for ax, (key, title, series, label_fmt) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=11)
        if key == "bulk-cpu":
            series_data = []
            for wkey, label in (("1-one-stream", "1 stream"), ("2-parallel-streams", "32 streams")):
                info = workloads.get(wkey)
                if info:
                    series_data.append((label, info, "cpu_s_per_gib"))
            names: list[str] = []
            for _label, info, m in series_data:
                names += [s for s in systems_of(info) if metric(info, s, m) is not None and s not in names]
            bars(ax, names, [(label, [metric(info, s, m) for s in names]) for label, info, m in series_data], label_fmt)
            continue
        info = workloads.get(key)
        if not info:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        names = [s for s in systems_of(info) if any(metric(info, s, m) is not None for m, _ in series)]
        bars(ax, names, [(label, [metric(info, s, m) for s in names]) for m, label in series], label_fmt)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLORS = {DIRECT: "#7f7f7f", CYTHON: "#1f77b4", CYTHON_2: "#17becf", PYTHON: "#aec7e8", HAPROXY: "#2ca02c",
          MICROSOCKS: "#ff7f0e", ZITI: "#9467bd"}


def bars(ax, names: list[str], series: list[tuple[str, list[float | None]]], label_fmt: str) -> None:
    if not names:
        ax.set_axis_off()
        return
    height = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        ys = [n + i * height - 0.4 + height / 2 for n in range(len(names))]
        vals = [v if v is not None else 0.0 for v in values]
        colors = [COLORS.get(n, "#8c564b") for n in names]
        ax.barh(ys, vals, height=height * 0.95, color=colors, alpha=1.0 if i == 0 else 0.55,
                label=label if len(series) > 1 else None, hatch=None if i == 0 else "//")
        for y, v in zip(ys, values):
            if v is not None:
                ax.text(v, y, " " + label_fmt.format(v), va="center", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=9)
    ax.invert_yaxis()
    ax.margins(x=0.2)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--markdown", type=Path, help="write the Markdown report here")
    parser.add_argument("--png", type=Path, help="write the chart here")
    args = parser.parse_args(argv)
    data, workloads = load(args.results)
    if not workloads:
        print(f"{args.results}: no zep benchmark workloads found", file=sys.stderr)
        return 1
    text = markdown(data, workloads)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    else:
        print(text)
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        chart(workloads, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
