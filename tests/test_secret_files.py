"""Secrets from files (`PROXY_PASSWORD_FILE`, `PROXY_USERNAME_FILE`, `ZITI_IDENTITY_FILE`), the way
official images read mounted Docker and Kubernetes secrets: the file holds what the plain variable
would, without its trailing newline; both set is an error naming both; a file's content never
reaches a log, and the variable leaves zep's environment once read."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tests.support.clients import curl
from tests.support.upstreams import Upstream
from tests.support.zepproc import run_zep, start_zep
from tests.support.ziti import identity_document, openziti_path, service, standin_library  # noqa: F401
from zep import cli
from zep.config import ConfigError, Settings, load_settings

PASSWORD = "file-borne-Secret-7d1f"


def settings(env: dict[str, str], *args: str) -> Settings:
    flags = vars(cli.build_parser().parse_args(["serve", *args]))
    flags.pop("command")
    return load_settings(env, flags)


def secret(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize("content", [PASSWORD, PASSWORD + "\n", PASSWORD + "\r\n"])
def test_password_file_without_its_trailing_newline(tmp_path: Path, content: str) -> None:
    s = settings({"PROXY_USERNAME": "ci", "PROXY_PASSWORD_FILE": secret(tmp_path, "pw", content)}, "--direct")
    assert (s.username, s.password) == ("ci", PASSWORD)


def test_username_file_and_an_empty_plain_variable_counts_as_unset(tmp_path: Path) -> None:
    s = settings({"PROXY_USERNAME": "", "PROXY_USERNAME_FILE": secret(tmp_path, "user", "robot\n"),
                  "PROXY_PASSWORD": "", "PROXY_PASSWORD_FILE": secret(tmp_path, "pw", PASSWORD)}, "--direct")
    assert (s.username, s.password, s.auth_required) == ("robot", PASSWORD, True)


def test_password_file_alone_keeps_the_default_user_name(tmp_path: Path) -> None:
    s = settings({"PROXY_HOST": "0.0.0.0", "PROXY_PASSWORD_FILE": secret(tmp_path, "pw", PASSWORD)}, "--direct")
    assert (s.username, s.password) == ("user", PASSWORD)  # real credentials: a remote listener is allowed


def test_a_flag_wins_and_the_file_is_not_read(tmp_path: Path) -> None:
    s = settings({"PROXY_USERNAME": "ci", "PROXY_PASSWORD_FILE": str(tmp_path / "missing")}, "--direct",
                 "--password", "from-the-flag")
    assert s.password == "from-the-flag"


def identity_text() -> str:
    return json.dumps({"ztAPI": "https://ctrl.example.test:1280", "id": {}})


@pytest.mark.parametrize("content", [identity_text() + "\n", base64.b64encode(identity_text().encode()).decode() + "\n"])
def test_identity_file_holds_the_json_or_its_base64(tmp_path: Path, content: str) -> None:
    s = settings({"ZITI_IDENTITY_FILE": secret(tmp_path, "identity", content)})
    assert s.ziti_identity == content.strip() and s.ziti_configured


@pytest.mark.parametrize(("plain", "file"), [("PROXY_PASSWORD", "PROXY_PASSWORD_FILE"),
                                             ("PROXY_USERNAME", "PROXY_USERNAME_FILE"),
                                             ("ZITI_IDENTITY", "ZITI_IDENTITY_FILE")])
def test_the_variable_and_its_file_together_is_an_error_naming_both(tmp_path: Path, plain: str, file: str) -> None:
    with pytest.raises(ConfigError, match=f"^{plain} and {file} are both set: use one$"):
        settings({plain: "x", file: secret(tmp_path, "s", "y")}, "--direct")


def test_unreadable_files_are_named_and_their_content_is_not(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"^PROXY_PASSWORD_FILE={missing} cannot be read: No such file"):
        settings({"PROXY_PASSWORD_FILE": str(missing)}, "--direct")
    with pytest.raises(ConfigError, match=f"PROXY_PASSWORD_FILE={tmp_path} cannot be read: Is a directory"):
        settings({"PROXY_PASSWORD_FILE": str(tmp_path)}, "--direct")
    big = secret(tmp_path, "big", "x" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="is larger than 1 MiB"):
        settings({"PROXY_PASSWORD_FILE": big}, "--direct")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + PASSWORD.encode())
    with pytest.raises(ConfigError, match="is not UTF-8 text") as caught:
        settings({"PROXY_PASSWORD_FILE": str(binary)}, "--direct")
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [
    ("not base64, not json " + PASSWORD, "ZITI_IDENTITY_FILE is not valid base64"),
    ("{ broken json " + PASSWORD, "ZITI_IDENTITY_FILE starts like JSON but is not an identity JSON document"),
    (base64.b64encode(PASSWORD.encode()).decode(), "ZITI_IDENTITY_FILE is base64 but does not decode to an identity"),
])
def test_a_bad_identity_file_is_named_without_its_content(tmp_path: Path, content: str, message: str) -> None:
    result = run_zep("serve", env={"ZITI_IDENTITY_FILE": secret(tmp_path, "identity", content)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"zep: error: {message}"), lines
    assert PASSWORD not in result.stderr and "broken json" not in result.stderr


def test_the_variables_leave_the_environment_once_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PROXY_USERNAME", "ci")
    monkeypatch.setenv("PROXY_PASSWORD_FILE", secret(tmp_path, "pw", PASSWORD))
    monkeypatch.setenv("PROXY_USERNAME_FILE", "")
    # An invalid port stops main() after the settings (and the file) were read, before anything listens.
    assert cli.main(["serve", "--direct", "--socks-port", "70000"]) == 2
    assert "--socks-port must be a port" in capsys.readouterr().err
    assert "PROXY_PASSWORD_FILE" not in os.environ and "PROXY_USERNAME_FILE" not in os.environ


def test_a_password_file_authenticates_both_listeners_and_never_reaches_the_log(tmp_path: Path,
                                                                                http_a: Upstream) -> None:
    path = secret(tmp_path, "proxy-password", PASSWORD + "\n")
    target = f"http://127.0.0.1:{http_a.port}/whoami"
    with start_zep("--direct", "--log-level", "debug", env={"PROXY_USERNAME": "ci", "PROXY_PASSWORD_FILE": path}) as zp:
        socks = curl("-x", f"socks5h://ci:{PASSWORD}@127.0.0.1:{zp.socks_port}", target)
        assert socks.returncode == 0 and json.loads(socks.stdout)["server"] == "a", socks.stderr
        http = curl("-x", f"http://ci:{PASSWORD}@127.0.0.1:{zp.http_port}", target)
        assert http.returncode == 0 and json.loads(http.stdout)["server"] == "a", http.stderr
        wrong = curl("-x", f"http://ci:{PASSWORD}-wrong@127.0.0.1:{zp.http_port}", "-o", "/dev/null",
                     "-w", "%{http_code}", target)
        assert wrong.stdout == b"407"
        zp.wait_for_log("outcome=auth-failed")
    assert PASSWORD not in zp.log_text()


def test_an_identity_file_with_the_json_loads_and_never_reaches_the_log(tmp_path: Path, openziti_path: Path,
                                                                        http_b: Upstream) -> None:
    document = identity_document([service("web-b", ["b.example.test"], ["80"], f"127.0.0.1:{http_b.port}")])
    text = json.dumps(document)
    env = {"ZITI_IDENTITY_FILE": secret(tmp_path, "ziti-identity", text + "\n"), "TMPDIR": str(tmp_path)}
    with start_zep("--fallback", "deny", "--log-level", "debug", env=env, extra_pythonpath=[str(openziti_path)]) as zp:
        result = curl("-x", f"socks5h://127.0.0.1:{zp.socks_port}", "http://b.example.test/whoami")
        assert result.returncode == 0 and json.loads(result.stdout)["server"] == "b", result.stderr
    log = zp.log_text()
    assert "ziti identity loaded" in log
    assert text[:40] not in log and base64.b64encode(text.encode()).decode()[:40] not in log
