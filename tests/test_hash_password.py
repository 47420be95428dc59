"""`zep hash-password`: the password comes from the terminal or stdin, never from the command line."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from tests.support.zepproc import run_zep, zep_env
from zep.passwords import check_hash_syntax, verify_password

WAIT = 30.0


def hash_from_stdin(data: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zep", "hash-password"], input=data, env=zep_env(),
                          capture_output=True, text=True, timeout=WAIT)


def test_a_piped_password_is_hashed_without_its_line_ending():
    for text in ("s3cret pass\n", "s3cret pass\r\n", "s3cret pass"):
        result = hash_from_stdin(text)
        assert result.returncode == 0, result.stderr
        printed = result.stdout.strip()
        check_hash_syntax(printed)
        assert verify_password("s3cret pass", printed)
        assert "s3cret" not in result.stdout + result.stderr
    two = [hash_from_stdin("same\n").stdout for _ in range(2)]
    assert two[0] != two[1]  # salted


def test_an_empty_password_is_refused():
    result = hash_from_stdin("\n")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "zep: error: the password is empty"


def test_a_password_on_the_command_line_is_refused_and_not_repeated():
    result = run_zep("hash-password", "hunter2-secret")
    assert result.returncode == 2 and result.stdout == ""
    assert "the password is not an argument" in result.stderr
    assert "hunter2" not in result.stderr


def _terminal_session(answers: list[str]) -> tuple[int, str]:
    """Run hash-password on a pseudo-terminal, answering each prompt; (exit status, what it printed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty, as in a login shell
        os.execve(sys.executable, [sys.executable, "-m", "zep", "hash-password"], zep_env())
    output = b""
    deadline = time.monotonic() + WAIT
    try:
        for answer in answers:
            prompts = output.count(b": ")
            while output.count(b": ") == prompts:
                assert time.monotonic() < deadline, f"no prompt within {WAIT} s: {output!r}"
                if select.select([fd], [], [], 1)[0]:
                    output += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
        while True:
            assert time.monotonic() < deadline, f"hash-password did not finish within {WAIT} s"
            if select.select([fd], [], [], 1)[0]:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_on_a_terminal_the_password_is_asked_twice_and_not_echoed():
    status, output = _terminal_session(["typed secret", "typed secret"])
    assert status == 0, output
    assert "Password: " in output and "Again: " in output
    assert "typed secret" not in output  # getpass turns echo off
    printed = output.strip().splitlines()[-1].strip()
    assert verify_password("typed secret", printed)


def test_on_a_terminal_two_different_answers_are_refused():
    status, output = _terminal_session(["one secret", "another"])
    assert status == 2
    assert "the two passwords differ" in output and "scrypt$" not in output
