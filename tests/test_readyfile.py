"""Ready file hygiene with real zep processes: private, atomic, removed, stale ones replaced,
live ones respected."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.zepproc import run_zep, start_zep
from zep import readyfile
from zep.auth import Credentials
from zep.readyfile import Ready, ReadyFileError

SERVE = ("serve", "--direct", "--socks-port", "0", "--http-port", "0")


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_ready_file_is_0600_holds_the_addresses_and_is_removed_at_exit(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    with start_zep("--direct", "--random-credentials", ready_path=ready) as zp:
        assert stat.S_IMODE(ready.stat().st_mode) == 0o600
        info = json.loads(ready.read_text())
        assert info["pid"] == zp.proc.pid
        assert info["socks5"] == f"127.0.0.1:{zp.socks_port}" and info["http"] == f"127.0.0.1:{zp.http_port}"
        assert info["username"].startswith("zep-") and len(info["password"]) >= 24
        assert [p.name for p in tmp_path.iterdir()] == ["zep.ready"]  # no temporary file left behind
        assert zp.stop() == 0
    assert not ready.exists()


def test_no_credentials_in_the_ready_file_without_authentication(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    with start_zep("--direct", "--no-auth", ready_path=ready):
        assert set(json.loads(ready.read_text())) == {"pid", "socks5", "http"}


def test_stale_ready_file_is_replaced(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    stale = gone_pid()
    ready.write_text(json.dumps({"pid": stale, "socks5": "127.0.0.1:1", "http": "127.0.0.1:2"}))
    with start_zep("--direct", ready_path=ready) as zp:
        assert json.loads(ready.read_text())["pid"] == zp.proc.pid
        zp.wait_for_log(f"replacing the stale ready file {ready}: the zep that wrote it (pid {stale}) is gone")


def test_an_empty_ready_file_made_ahead_is_used(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    ready.touch()
    with start_zep("--direct", ready_path=ready) as zp:
        assert json.loads(ready.read_text())["pid"] == zp.proc.pid


def test_a_live_zeps_ready_file_stops_a_second_zep(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    with start_zep("--direct", ready_path=ready) as first:
        result = run_zep(*SERVE, "--ready-file", str(ready))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"zep: error: the ready file {ready} (ZEP_READY_FILE/--ready-file) belongs to a zep that is still "
            f"running (pid {first.proc.pid}): stop it, or give this zep another ready file")
        assert json.loads(ready.read_text())["pid"] == first.proc.pid  # untouched
    assert not ready.exists()


def test_a_file_that_is_not_a_ready_file_is_left_alone(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("not json\n")
    result = run_zep(*SERVE, "--ready-file", str(precious))
    assert result.returncode == 2
    assert f"{precious} (ZEP_READY_FILE/--ready-file) exists and is not a zep ready file" in result.stderr
    assert precious.read_text() == "not json\n"


def test_ready_file_in_a_missing_directory_names_the_path_and_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "zep.ready"
    result = run_zep(*SERVE, env={"ZEP_READY_FILE": str(missing)})
    assert result.returncode == 2
    assert result.stderr.strip() == (f"zep: error: cannot write the ready file {missing} (ZEP_READY_FILE/--ready-file): "
                                     f"directory {missing.parent} does not exist")


def test_another_zeps_ready_file_is_not_removed(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    readyfile.write(str(ready), Ready(os.getpid(), "127.0.0.1:1", None, Credentials("u", "p")))
    readyfile.remove(str(ready), os.getpid() + 1)
    assert ready.exists()
    readyfile.remove(str(ready), os.getpid())
    assert not ready.exists()


def test_a_reused_pid_is_not_a_running_zep() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert not readyfile.zep_is_running(sleeper.pid)  # alive, but not a zep
    finally:
        sleeper.communicate()
    assert not readyfile.zep_is_running(gone_pid())
    assert not readyfile.zep_is_running(os.getpid())


def test_reading_a_stale_ready_file_says_so(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    stale = gone_pid()
    ready.write_text(json.dumps({"pid": stale, "socks5": "127.0.0.1:1"}))
    with pytest.raises(ReadyFileError, match=rf"is stale: its zep \(pid {stale}\) is not running"):
        readyfile.read(str(ready))
    ready.write_text("[1, 2]")
    with pytest.raises(ReadyFileError, match="is not a zep ready file"):
        readyfile.read(str(ready))
