"""Enrollment with one-time tokens: the stand-in's `Ziti_enroll_identity` under the real
`openziti.enroll`, zep's token checks and output files, `zep enroll`, and `zep serve` enrolling at
start-up (ZITI_ENROLL_TOKEN, --enroll-token-file), reaching services with curl afterwards."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.clients import curl
from tests.support.upstreams import Upstream
from tests.support.zepproc import ZepProcess, run_zep, start_zep, zep_env
from tests.support.ziti import (  # noqa: F401  (fixtures)
    CONTROLLER,
    credentials,
    enrollment_claims,
    jwt,
    openziti_path,
    sdk_on_path,
    service,
    standin_library,
    write_enrollment_token,
)
from zep.enrollment import EnrollmentError, IdentityOutput, parse_token
from zep.identity_check import check_identity

HOST = "web.enrolled.test"


def web(http_a: Upstream) -> list[dict]:
    return [service("web", [HOST], ["80"], f"127.0.0.1:{http_a.port}")]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def used_tokens(token_file: Path) -> list[str]:
    ledger = Path(f"{token_file}.used")
    return ledger.read_text().split() if ledger.exists() else []


def claims_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def whoami_through(zp: ZepProcess) -> str:
    result = curl("-x", f"socks5h://127.0.0.1:{zp.socks_port}", f"http://{HOST}/whoami")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["server"]


def assert_no_secrets(text: str, token: str) -> None:
    key, _cert = credentials()
    for secret in (token, token.split(".")[1][:40], claims_of(token)["jti"], key.splitlines()[1]):
        assert secret not in text


# ----------------------------------------------------------------------------- the stand-in under openziti.enroll


@pytest.fixture
def openziti(sdk_on_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.delenv("ZITI_IDENTITIES", raising=False)
    import openziti

    return openziti


def test_standin_enrolls_once_and_returns_an_identity(openziti, tmp_path: Path, http_a: Upstream) -> None:
    token_file = tmp_path / "ci.jwt"
    token = write_enrollment_token(token_file, web(http_a))
    identity = openziti.enroll(token)  # Ziti_enroll_identity; the package frees the returned JSON
    document = json.loads(identity)
    assert document["ztAPI"] == CONTROLLER and document["ztAPIs"] == [CONTROLLER]
    assert document["id"]["key"].startswith("-----BEGIN PRIVATE KEY-----")  # bare PEM, as the SDK writes it
    assert check_identity("enrolled", identity.encode()) == CONTROLLER
    assert document["standin"]["services"][0]["name"] == "web"
    assert used_tokens(token_file) == [claims_of(token)["jti"]]
    assert mode(Path(f"{token_file}.used")) == 0o600
    with pytest.raises(RuntimeError, match="^JWT not accepted by controller$"):  # one-time
        openziti.enroll(token)
    with pytest.raises(RuntimeError, match="^JWT not accepted by controller$"):  # from the file: the same token
        openziti.enroll(str(token_file))


@pytest.mark.parametrize("token", [
    "not-a-jwt",
    "only.two",
    "a.b.c.d",
    "!!!.e30.c2ln",  # header is not base64url
    f"{base64.urlsafe_b64encode(b'[1]').decode()}.e30.c2ln",  # header is not an object
    "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",  # claims without iss, jti, em
])
def test_standin_refuses_a_malformed_token_with_the_sdk_code(openziti, token: str) -> None:
    with pytest.raises(RuntimeError, match="^JWT has invalid format$"):
        openziti.enroll(token)


def test_standin_refuses_an_expired_token(openziti, tmp_path: Path) -> None:
    token = write_enrollment_token(tmp_path / "old.jwt", expires_in=-60)
    with pytest.raises(RuntimeError, match="^JWT not accepted by controller$"):
        openziti.enroll(token)
    assert used_tokens(tmp_path / "old.jwt") == []


def test_standin_token_for_a_real_controller_cannot_reach_it(openziti, tmp_path: Path) -> None:
    claims = enrollment_claims(tmp_path / "real.jwt")
    del claims["standin"]
    with pytest.raises(RuntimeError, match="^ziti controller is not available$"):
        openziti.enroll(jwt(claims))


# ----------------------------------------------------------------------------- tokens and output files


@pytest.mark.parametrize("text, message", [
    ("", "ci.jwt is empty: expected an enrollment token (a JWT)"),
    ("  \n", "ci.jwt is empty: expected an enrollment token (a JWT)"),
    ("hello", "ci.jwt is not an enrollment token (a JWT: three base64url parts joined by dots)"),
    ("e30.e30.", "ci.jwt is not an enrollment token (a JWT: three base64url parts joined by dots)"),
    ("W10.e30.c2ln", "ci.jwt is not an enrollment token (a JWT: three base64url parts joined by dots)"),
    ("e30.e30.c2ln", "ci.jwt is a JWT but not a Ziti enrollment token (its iss is not a controller URL)"),
    (jwt({"iss": "https://c:1280", "exp": 1700000000}),
     "the enrollment token from ci.jwt expired at 2023-11-14 22:13:20 UTC: ask for a new one"),
])
def test_parse_token_refuses(text: str, message: str) -> None:
    with pytest.raises(EnrollmentError) as caught:
        parse_token(text, "ci.jwt")
    assert str(caught.value) == message


def test_parse_token_keeps_the_token_out_of_its_repr(tmp_path: Path) -> None:
    token = write_enrollment_token(tmp_path / "ci.jwt")
    parsed = parse_token(token + "\n", "ci.jwt")
    assert parsed.text == token and parsed.controller == CONTROLLER
    assert token not in repr(parsed)


def test_identity_output_claims_the_path_and_writes_0600(tmp_path: Path) -> None:
    os.umask(0o000)  # whatever the umask, the identity is private
    try:
        out = IdentityOutput(str(tmp_path / "id.json"))
    finally:
        os.umask(0o022)
    with pytest.raises(EnrollmentError, match=r"id\.json already exists: not overwriting it \(--force replaces it\)"):
        IdentityOutput(str(tmp_path / "id.json"))
    out.commit(b'{"a": 1}')
    assert mode(tmp_path / "id.json") == 0o600 and (tmp_path / "id.json").read_bytes() == b'{"a": 1}'
    replacing = IdentityOutput(str(tmp_path / "id.json"), force=True)
    assert (tmp_path / "id.json").read_bytes() == b'{"a": 1}'  # untouched until commit
    replacing.commit(b'{"b": 2}')
    assert (tmp_path / "id.json").read_bytes() == b'{"b": 2}' and mode(tmp_path / "id.json") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.json"]


def test_identity_output_discard_leaves_nothing(tmp_path: Path) -> None:
    IdentityOutput(str(tmp_path / "new.json")).discard()
    IdentityOutput(str(tmp_path / "new.json"), force=True).discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EnrollmentError, match="directory .*missing does not exist"):
        IdentityOutput(str(tmp_path / "missing" / "id.json"))


# ----------------------------------------------------------------------------- zep enroll


def enroll(*args: str, openziti_path: Path, **kwargs) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([sys.executable, "-m", "zep", "enroll", *args],
                          env=zep_env({"ZITI_LOG": "4"}, None, [str(openziti_path)]),
                          capture_output=True, text=True, timeout=60, **kwargs)


def test_zep_enroll_then_serve_reaches_the_service(tmp_path: Path, openziti_path: Path, http_a: Upstream) -> None:  # noqa: F811
    token_file = tmp_path / "ci.jwt"
    token = write_enrollment_token(token_file, web(http_a))
    out = tmp_path / "ci.json"
    result = enroll("--jwt", str(token_file), "-o", str(out), openziti_path=openziti_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"zep: enrolled with {CONTROLLER}: identity written to {out} (mode 0600)\n"
    assert_no_secrets(result.stdout + result.stderr, token)
    assert mode(out) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci.json", "ci.jwt", "ci.jwt.used"]
    with start_zep("--identity", str(out), "--fallback", "deny", extra_pythonpath=[str(openziti_path)]) as zp:
        assert whoami_through(zp) == "a"
        assert f"ziti identity loaded: {out} (controller {CONTROLLER})" in zp.log_text()


def test_zep_enroll_reads_the_token_from_stdin(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token = write_enrollment_token(tmp_path / "ci.jwt")
    result = enroll("--jwt", "-", "-o", str(tmp_path / "ci.json"), openziti_path=openziti_path, input=token + "\n")
    assert result.returncode == 0, result.stderr
    assert mode(tmp_path / "ci.json") == 0o600


def test_zep_enroll_a_used_token_fails_with_a_clear_line(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "ci.jwt"
    write_enrollment_token(token_file)
    assert enroll("--jwt", str(token_file), "-o", str(tmp_path / "first.json"), openziti_path=openziti_path).returncode == 0
    result = enroll("--jwt", str(token_file), "-o", str(tmp_path / "second.json"), openziti_path=openziti_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"zep: error: enrollment with the token from {token_file} failed: JWT not accepted by controller "
        "(Ziti error -3): the controller refused it: it was used before, has expired or was revoked; ask for a new one")
    assert not (tmp_path / "second.json").exists()


def test_zep_enroll_does_not_overwrite_and_keeps_the_token_unspent(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "ci.jwt"
    write_enrollment_token(token_file)
    out = tmp_path / "ci.json"
    out.write_text("keep me")
    result = enroll("--jwt", str(token_file), "-o", str(out), openziti_path=openziti_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"zep: error: {out} already exists: not overwriting it (--force replaces it)"]
    assert out.read_text() == "keep me" and used_tokens(token_file) == []
    result = enroll("--jwt", str(token_file), "-o", str(out), "--force", openziti_path=openziti_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["ztAPI"] == CONTROLLER and mode(out) == 0o600


@pytest.mark.parametrize("content, message", [
    ("garbage\n", "{path} is not an enrollment token (a JWT: three base64url parts joined by dots)"),
    (jwt({"iss": CONTROLLER, "exp": 1700000000}),
     "the enrollment token from {path} expired at 2023-11-14 22:13:20 UTC: ask for a new one"),
])
def test_zep_enroll_checks_the_token_before_the_sdk(tmp_path: Path, openziti_path: Path, content: str,  # noqa: F811
                                                    message: str) -> None:
    token_file = tmp_path / "bad.jwt"
    token_file.write_text(content)
    result = enroll("--jwt", str(token_file), "-o", str(tmp_path / "id.json"), openziti_path=openziti_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"zep: error: {message.format(path=token_file)}"]  # no SDK log: not called
    assert list(tmp_path.iterdir()) == [token_file]


def test_zep_enroll_missing_token_file(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    result = enroll("--jwt", str(tmp_path / "nope.jwt"), "-o", str(tmp_path / "id.json"), openziti_path=openziti_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zep: error: cannot read the enrollment token file {tmp_path / 'nope.jwt'}: No such file or directory"]


# ----------------------------------------------------------------------------- zep serve enrolling at start-up


def test_serve_with_ziti_enroll_token_keeps_the_identity_private_for_the_run(tmp_path: Path, openziti_path: Path,  # noqa: F811
                                                                             http_a: Upstream) -> None:
    token = write_enrollment_token(tmp_path / "ci.jwt", web(http_a))
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {"ZITI_ENROLL_TOKEN": token, "TMPDIR": str(private_tmp), "ZITI_LOG": "4"}
    with start_zep("--fallback", "deny", env=env, extra_pythonpath=[str(openziti_path)]) as zp:
        (enrolled,) = private_tmp.glob("zep-ziti-*/enrolled.json")
        assert mode(enrolled) == 0o600 and mode(enrolled.parent) == 0o700
        assert whoami_through(zp) == "a"
        assert "ziti identity loaded: enrolled from ZITI_ENROLL_TOKEN (controller " in zp.log_text()
        cmdline = Path(f"/proc/{zp.proc.pid}/cmdline").read_bytes().decode()
        assert token not in cmdline and claims_of(token)["jti"] not in cmdline
        assert zp.stop() == 0
    assert list(private_tmp.iterdir()) == []
    assert_no_secrets(zp.log_text(), token)


def test_serve_with_a_token_file_and_an_identity_out_enrolls_once(tmp_path: Path, openziti_path: Path,  # noqa: F811
                                                                  http_a: Upstream) -> None:
    token_file = tmp_path / "ci.jwt"
    token = write_enrollment_token(token_file, web(http_a))
    out = tmp_path / "ids" / "ci.json"
    out.parent.mkdir()
    args = ("--enroll-token-file", str(token_file), "--enroll-identity-out", str(out), "--fallback", "deny")
    with start_zep(*args, extra_pythonpath=[str(openziti_path)]) as zp:
        assert whoami_through(zp) == "a"
        assert f"ziti identity loaded: {out} (controller {CONTROLLER})" in zp.log_text()
    assert mode(out) == 0o600 and check_identity(str(out), out.read_bytes()) == CONTROLLER
    assert_no_secrets(zp.log_text(), token)
    with start_zep(*args, extra_pythonpath=[str(openziti_path)]) as again:  # a restart with the same settings
        assert whoami_through(again) == "a"
        assert f"ziti: {out} exists: loading it and leaving the enrollment token unused" in again.log_text()
    assert used_tokens(token_file) == [claims_of(token)["jti"]]


def test_serve_with_a_used_token_exits_2(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "ci.jwt"
    token = write_enrollment_token(token_file)
    with start_zep(env={"ZITI_ENROLL_TOKEN": token}, extra_pythonpath=[str(openziti_path)]):
        pass
    result = run_zep("serve", "--host", "127.0.0.1", "--socks-port", "0", "--http-port", "0",
                     "--enroll-token-file", str(token_file), extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        f"zep: error: enrollment with the token from {token_file} failed: JWT not accepted by controller (Ziti error -3)")


def test_serve_checks_identities_before_spending_the_token(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "ci.jwt"
    write_enrollment_token(token_file)
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    result = run_zep("serve", "--enroll-token-file", str(token_file), "--identity", str(broken),
                     extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zep: error: Ziti identity {broken}: is a JSON array, not an object with ztAPI and id"]
    assert used_tokens(token_file) == []


@pytest.mark.parametrize("args, env, message", [
    (["--enroll-token-file", "t.jwt"], {"ZITI_ENROLL_TOKEN": "x"},
     "ZITI_ENROLL_TOKEN and --enroll-token-file are both set: use one"),
    (["--enroll-identity-out", "id.json", "--direct"], {},
     "--enroll-identity-out is set but there is no enrollment token (ZITI_ENROLL_TOKEN or --enroll-token-file)"),
    ([], {"ZITI_ENROLL_TOKEN": "not-a-token"},
     "ZITI_ENROLL_TOKEN is not an enrollment token (a JWT: three base64url parts joined by dots)"),
])
def test_serve_enrollment_settings_errors(args: list, env: dict, message: str) -> None:
    result = run_zep("serve", *args, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"zep: error: {message}"]


def test_processes_started_after_enrolling_inherit_no_token(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    """What zep starts (zep run's command, say) sees neither the token nor the variable, in its
    environment or on its command line."""
    token = write_enrollment_token(tmp_path / "ci.jwt")
    script = textwrap.dedent("""
        import os, subprocess, sys
        from zep import ziti
        from zep.config import load_settings
        dialer = ziti.start(load_settings(os.environ, {}))
        child = subprocess.run(["sh", "-c", "cat /proc/$$/environ; echo; cat /proc/$$/cmdline"], capture_output=True)
        dialer.close()
        sys.stdout.buffer.write(child.stdout)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                            env=zep_env({"ZITI_ENROLL_TOKEN": token}, None, [str(openziti_path)]))
    assert result.returncode == 0, result.stderr
    seen = result.stdout.decode(errors="replace")
    assert "PATH=" in seen  # the child's environment was read
    assert "ZITI_ENROLL_TOKEN" not in seen and token not in seen and claims_of(token)["jti"] not in seen


def test_enrolling_is_bounded_by_the_timeout(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "slow.jwt"
    write_enrollment_token(token_file, enroll_delay_ms=20000)
    result = enroll("--jwt", str(token_file), "-o", str(tmp_path / "id.json"), "--timeout", "0.5",
                    openziti_path=openziti_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"zep: error: enrollment with the token from {token_file} did not finish within 0.5 s "
        f"(controller {CONTROLLER}; --timeout); the token may have been used")
    assert not (tmp_path / "id.json").exists()


def test_serve_claims_the_identity_out_before_spending_the_token(tmp_path: Path, openziti_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "ci.jwt"
    write_enrollment_token(token_file)
    out = tmp_path / "missing-dir" / "ci.json"
    result = run_zep("serve", "--enroll-token-file", str(token_file), "--enroll-identity-out", str(out),
                     extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"zep: error: cannot write the identity to {out}: directory {out.parent} does not exist"]
    assert used_tokens(token_file) == []
