"""The `zep run` summary, fed the access entries an exchange ends with."""

from __future__ import annotations

from zep.accesslog import AccessEntry
from zep.outcome import Outcome
from zep.summary import MOST_PROBLEMS, Summary


def entry(target: str, route: str, outcome: Outcome, up: int = 0, down: int = 0, detail: str = "") -> AccessEntry:
    return AccessEntry(client="127.0.0.1:5000", proto="socks5", target=target, route=route, user="zep-1",
                       up=up, down=down, seconds=0.1, outcome=outcome, detail=detail)


def test_routes_are_counted_with_their_bytes_busiest_first() -> None:
    summary = Summary()
    for _ in range(3):
        summary.observe(entry("web.corp:443", "ziti:intercept", Outcome.OK, up=1000, down=3 * 1024 * 1024))
    summary.observe(entry("pypi.org:443", "direct", Outcome.OK, up=10, down=20))
    lines = summary.render().splitlines()
    assert lines[0] == "zep: 4 connections through the proxy"
    assert lines[2].split() == ["ziti:intercept", "3", "2.9", "KiB", "9.0", "MiB"]
    assert lines[3].split() == ["direct", "1", "10", "B", "20", "B"]
    assert len(lines) == 4  # nothing failed: no problem section


def test_denied_and_failed_destinations_are_grouped_with_the_first_reason() -> None:
    summary = Summary()
    summary.observe(entry("evil.test:443", "deny", Outcome.DENIED))
    summary.observe(entry("evil.test:443", "deny", Outcome.DENIED))
    summary.observe(entry("down.test:80", "-", Outcome.DIAL_FAILED, detail="connection refused"))
    summary.observe(entry("-", "-", Outcome.AUTH_FAILED, detail="no proxy credentials"))
    summary.observe(entry("ok.test:80", "direct", Outcome.CLIENT_CLOSED))  # the client's choice, not a failure
    summary.observe(entry("late.test:80", "direct", Outcome.CANCELLED))  # zep stopped after the job
    text = summary.render()
    assert "zep: 3 destinations denied or failed:" in text
    assert "  evil.test:443 denied x2\n" in text
    assert "  down.test:80 dial-failed: connection refused\n" in text
    assert "  (no destination yet) auth-failed: no proxy credentials\n" in text
    assert "ok.test" not in text.split("denied or failed:")[1] and "late.test" not in text.split("denied or failed:")[1]
    assert "(no route)" in text


def test_a_long_list_stays_one_screen() -> None:
    summary = Summary()
    for n in range(MOST_PROBLEMS + 7):
        summary.observe(entry(f"host{n}.test:80", "deny", Outcome.DENIED))
    lines = summary.render().splitlines()
    assert lines[-1] == "  ... and 7 more (see the access log)"
    assert len(lines) <= 24


def test_no_connections_at_all() -> None:
    assert Summary().render() == "zep: the command made no connections through the proxy\n"
