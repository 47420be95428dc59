"""The release smoke test (`scripts/smoke_test.py`) pointed at a local `zep serve --direct`: it passes
against a working zep and fails, saying why, when the credentials are wrong or a listener is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.upstreams import closed_port
from tests.support.zepproc import ZepProcess, start_zep

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "smoke_test.py"
PASSWORD = "smoke-Secret-31f9"


def smoke(zp: ZepProcess, *args: str, socks_port: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--socks", f"127.0.0.1:{socks_port or zp.socks_port}",
                           "--http", f"127.0.0.1:{zp.http_port}", *args], capture_output=True, text=True, timeout=120)


def password_file(tmp_path: Path, password: str) -> str:
    path = tmp_path / "proxy-password"
    path.write_text(password + "\n")
    return str(path)


def test_passes_against_a_zep_with_credentials_and_its_checks_reach_zep(tmp_path: Path) -> None:
    with start_zep("--direct", env={"PROXY_USERNAME": "ci", "PROXY_PASSWORD": PASSWORD}) as zp:
        result = smoke(zp, "--username", "ci", "--password-file", password_file(tmp_path, PASSWORD))
        assert result.returncode == 0, result.stdout + result.stderr
        for check in ("SOCKS5", "HTTP proxy, absolute-form", "HTTP proxy, CONNECT", "a wrong password is refused"):
            assert f"ok: {check}" in result.stdout
        zp.wait_for_log("proto=http ")
        assert zp.wait_for_log("proto=socks5 ") and zp.wait_for_log("outcome=auth-failed")


def test_passes_against_a_zep_without_authentication() -> None:
    with start_zep("--direct") as zp:
        result = smoke(zp)
        assert result.returncode == 0, result.stdout + result.stderr


def test_fails_with_the_wrong_password(tmp_path: Path) -> None:
    with start_zep("--direct", env={"PROXY_USERNAME": "ci", "PROXY_PASSWORD": PASSWORD}) as zp:
        result = smoke(zp, "--username", "ci", "--password-file", password_file(tmp_path, "not-it"))
    assert result.returncode == 1
    assert result.stderr.startswith("FAILED: SOCKS5: curl exited")


def test_fails_when_a_listener_is_gone() -> None:
    with start_zep("--direct") as zp:
        result = smoke(zp, socks_port=closed_port())
    assert result.returncode == 1 and "FAILED: SOCKS5" in result.stderr


def test_fails_when_the_admin_endpoint_does_not_answer() -> None:
    with start_zep("--direct") as zp:
        result = smoke(zp, "--admin", f"127.0.0.1:{closed_port()}")
    assert result.returncode == 1 and "FAILED: admin /healthz" in result.stderr
    assert "ok: HTTP proxy, CONNECT" in result.stdout  # the proxy checks ran first and passed
