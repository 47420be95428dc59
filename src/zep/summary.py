"""The one-screen account `zep run` prints when its command ends: what the job tried to reach.

An access-log observer (`accesslog.subscribe`): connections and bytes per route, and every
destination that was denied or failed, grouped, with how often and the first reason given.
"""

from __future__ import annotations

from dataclasses import dataclass

from zep.accesslog import AccessEntry
from zep.outcome import Outcome, Party

MOST_PROBLEMS = 15  # lines of denied or failed destinations, so the summary stays one screen
_NOT_PROBLEMS = {Outcome.CANCELLED}  # zep stopped after the job ended: nobody's failure


@dataclass
class _Tally:
    connections: int = 0
    up: int = 0
    down: int = 0


@dataclass
class _Problem:
    count: int
    detail: str


class Summary:
    def __init__(self) -> None:
        self.routes: dict[str, _Tally] = {}
        self.problems: dict[tuple[str, str], _Problem] = {}

    def observe(self, entry: AccessEntry) -> None:
        tally = self.routes.setdefault(entry.route, _Tally())
        tally.connections += 1
        tally.up += entry.up
        tally.down += entry.down
        if entry.outcome.by in (Party.SERVER, Party.PROXY) and entry.outcome not in _NOT_PROBLEMS:
            key = (entry.target, entry.outcome.label)
            problem = self.problems.setdefault(key, _Problem(0, entry.detail))
            problem.count += 1

    def render(self) -> str:
        total = sum(tally.connections for tally in self.routes.values())
        if not total:
            return "zep: the command made no connections through the proxy\n"
        lines = [f"zep: {total} connection{'s' if total != 1 else ''} through the proxy",
                 f"  {'route':<24} {'connections':>11} {'sent':>10} {'received':>10}"]
        for route, tally in sorted(self.routes.items(), key=lambda item: -item[1].connections):
            name = route if route != "-" else "(no route)"
            lines.append(f"  {name:<24} {tally.connections:>11} {_size(tally.up):>10} {_size(tally.down):>10}")
        if self.problems:
            lines.append(f"zep: {len(self.problems)} destination{'s' if len(self.problems) != 1 else ''} "
                         "denied or failed:")
            ordered = sorted(self.problems.items(), key=lambda item: -item[1].count)
            for (target, outcome), problem in ordered[:MOST_PROBLEMS]:
                times = f" x{problem.count}" if problem.count > 1 else ""
                reason = f": {problem.detail}" if problem.detail else ""
                lines.append(f"  {target if target != '-' else '(no destination yet)'} {outcome}{times}{reason}")
            if len(ordered) > MOST_PROBLEMS:
                lines.append(f"  ... and {len(ordered) - MOST_PROBLEMS} more (see the access log)")
        return "\n".join(lines) + "\n"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
