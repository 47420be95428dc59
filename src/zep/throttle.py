"""Failed logins: slow down a source that keeps guessing, and log its failures in aggregate.

Both parts are sans-IO with an injected clock. `LoginThrottle` says how long to hold the answer
to a login from a source: nothing for its first few failures, then a delay that doubles up to a
cap. Every answer to a throttled source waits, the right password included, so a guesser cannot
take "no answer yet" for "wrong". A right password resets the source; other sources never wait.
`FailedLoginDigest` folds the access lines of a source the throttle holds back (its failures past
the free ones): one line with a `count` per source and interval, written when the interval ends.
Both remember a bounded number of sources, least recently seen forgotten first.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from zep import accesslog
from zep.accesslog import AccessEntry
from zep.outcome import Outcome

Clock = Callable[[], float]

FREE_FAILURES = 5  # failures from one source answered at once
FIRST_DELAY = 0.1  # seconds, doubling with each failure after the free ones
MAX_DELAY = 2.0
FORGIVE_AFTER = 300.0  # seconds without a failure after which a source starts afresh
MAX_SOURCES = 10_000
DIGEST_INTERVAL = 10.0  # seconds per aggregated access line


def source_of(client: str) -> str:
    """The address part of "host:port" / "[v6]:port": what a source is throttled by."""
    return client.rpartition(":")[0] or client


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    def __init__(self, *, free_failures: int = FREE_FAILURES, first_delay: float = FIRST_DELAY,
                 max_delay: float = MAX_DELAY, forgive_after: float = FORGIVE_AFTER,
                 max_sources: int = MAX_SOURCES, clock: Clock = time.monotonic) -> None:
        self.free_failures = free_failures
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.forgive_after = forgive_after
        self.max_sources = max_sources
        self._clock = clock
        self._sources: OrderedDict[str, _Failures] = OrderedDict()
        self.failures_total = 0
        self.delayed_total = 0  # answers that were held (delay() > 0 when recorded)

    def __len__(self) -> int:
        return len(self._sources)

    def holds(self, source: str) -> bool:
        """Whether answers to `source` are held back: it has failed more than the free times."""
        failures = self._current(source)
        return failures is not None and failures.count > self.free_failures

    def delay(self, source: str) -> float:
        """Seconds to hold the answer to a login from `source` (0 unless it keeps failing)."""
        failures = self._current(source)
        beyond = (0 if failures is None else failures.count) - self.free_failures
        if beyond < 0:
            return 0.0
        return min(self.first_delay * 2.0 ** beyond, self.max_delay)

    def record(self, source: str, accepted: bool) -> None:
        """The outcome of a login whose answer was held for delay(source)."""
        if self.delay(source):
            self.delayed_total += 1
        if accepted:
            self._sources.pop(source, None)
            return
        failures = self._current(source)
        if failures is None:
            failures = self._sources[source] = _Failures(0, 0.0)
        self.failures_total += 1
        failures.count += 1
        failures.last = self._clock()
        self._sources.move_to_end(source)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)

    def _current(self, source: str) -> _Failures | None:
        failures = self._sources.get(source)
        if failures is not None and self._clock() - failures.last >= self.forgive_after:
            del self._sources[source]
            return None
        return failures


@dataclass
class _Window:
    started: float
    folded: int = 0
    last: AccessEntry | None = None  # the latest folded entry


class FailedLoginDigest:
    def __init__(self, held: Callable[[str], bool], *, interval: float = DIGEST_INTERVAL,
                 max_sources: int = MAX_SOURCES, clock: Clock = time.monotonic) -> None:
        self.held = held  # whether the throttle holds a source back (LoginThrottle.holds)
        self.interval = interval
        self.max_sources = max_sources
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._ready: list[AccessEntry] = []  # aggregates of windows that ended early (evicted, restarted)

    def fold(self, entry: AccessEntry) -> bool:
        """True when `entry`'s line is folded into its source's aggregate (write nothing now)."""
        if entry.outcome is not Outcome.AUTH_FAILED:
            return False
        source = source_of(entry.client)
        if not self.held(source):
            return False
        now = self._clock()
        window = self._windows.get(source)
        if window is None or now - window.started >= self.interval:
            self._close(source)
            window = self._windows[source] = _Window(now)
            while len(self._windows) > self.max_sources:
                self._close(next(iter(self._windows)))
        window.folded += 1
        window.last = entry
        self._windows.move_to_end(source)
        return True

    def due(self) -> list[AccessEntry]:
        """Aggregated entries of the intervals that have ended."""
        now = self._clock()
        for source in [s for s, w in self._windows.items() if now - w.started >= self.interval]:
            self._close(source)
        return self._take_ready()

    def flush(self) -> list[AccessEntry]:
        """Every pending aggregate, interval over or not (at shutdown)."""
        for source in list(self._windows):
            self._close(source)
        return self._take_ready()

    def _close(self, source: str) -> None:
        window = self._windows.pop(source, None)
        if window is not None and window.last is not None:
            self._ready.append(window.last._replace(
                count=window.folded,
                detail=f"{window.folded} failed logins from {source} within {self.interval:g} s, each "
                       f"answered late; the last: {window.last.detail}"))

    def _take_ready(self) -> list[AccessEntry]:
        ready, self._ready = self._ready, []
        return ready


async def write_digests(digest: FailedLoginDigest) -> None:
    """Run until cancelled: fold failed-login lines, write each aggregate when its interval ends."""
    accesslog.fold_lines(digest.fold)
    try:
        while True:
            await asyncio.sleep(digest.interval / 4)
            for entry in digest.due():
                accesslog.write(entry)
    finally:
        accesslog.fold_lines(None)
        for entry in digest.flush():
            accesslog.write(entry)
