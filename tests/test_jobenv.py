"""The variables `zep run` and `zep env` give a job, and how each format writes them."""

from __future__ import annotations

import json
import subprocess

import pytest

from zep import jobenv
from zep.auth import Credentials
from zep.readyfile import Ready

BOTH = Ready(4242, "127.0.0.1:1081", "127.0.0.1:8081", Credentials("ci user", "p@ss:w/rd"), ("cache.corp",))


def test_both_spellings_and_percent_encoded_credentials() -> None:
    variables = jobenv.variables(BOTH, ["extra.corp", "cache.corp"])
    assert variables["ALL_PROXY"] == variables["all_proxy"] == "socks5h://ci%20user:p%40ss%3Aw%2Frd@127.0.0.1:1081"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        assert variables[name] == "http://ci%20user:p%40ss%3Aw%2Frd@127.0.0.1:8081"
    assert variables["NO_PROXY"] == variables["no_proxy"] == "localhost,127.0.0.1,::1,cache.corp,extra.corp"


@pytest.mark.parametrize(("socks", "http", "everything", "web"), [
    ("127.0.0.1:1081", None, "socks5h://127.0.0.1:1081", "socks5h://127.0.0.1:1081"),
    (None, "[::1]:8081", "http://[::1]:8081", "http://[::1]:8081"),
])
def test_with_one_listener_every_variable_points_at_it(socks: str | None, http: str | None, everything: str, web: str) -> None:
    variables = jobenv.variables(Ready(1, socks, http, None))
    assert variables["ALL_PROXY"] == everything and variables["HTTPS_PROXY"] == web


def test_job_environment_drops_identities_and_other_proxy_settings() -> None:
    variables = jobenv.variables(BOTH)
    environ = {"PATH": "/bin", "ZITI_IDENTITY": "secret", "ZITI_ENROLL_TOKEN": "jwt", "Http_Proxy": "http://elsewhere:1"}
    job = jobenv.job_environment(environ, variables)
    assert job == {"PATH": "/bin", **variables}


def test_sh_format_survives_the_shell() -> None:
    text = jobenv.render(jobenv.variables(BOTH), "sh")
    result = subprocess.run(["sh", "-c", text + 'printf "%s\\n" "$ALL_PROXY" "$no_proxy"'], capture_output=True,
                            text=True, timeout=30)
    assert result.stdout.splitlines() == ["socks5h://ci%20user:p%40ss%3Aw%2Frd@127.0.0.1:1081",
                                          "localhost,127.0.0.1,::1,cache.corp"]


def test_json_and_line_formats() -> None:
    variables = jobenv.variables(BOTH)
    assert json.loads(jobenv.render(variables, "json")) == variables
    for form in ("github", "dotenv"):
        assert dict(line.split("=", 1) for line in jobenv.render(variables, form).splitlines()) == variables
