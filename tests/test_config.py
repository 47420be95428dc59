"""Settings from the original ziti-edge-proxy variables, ZEP_* variables and flags; bad values exit 2."""

from __future__ import annotations

import os

import pytest

from zep.cli import build_parser
from zep.config import ConfigError, Settings, available_cpus, load_settings, split_host_port
from tests.support.zepproc import run_zep, start_zep


def settings(env: dict[str, str], *args: str) -> Settings:
    flags = vars(build_parser().parse_args(["serve", *args]))
    flags.pop("command")
    return load_settings(env, flags)


def test_defaults_are_the_original_projects():
    s = settings({}, "--direct")
    assert (s.proxy_host, s.socks_enabled, s.http_enabled, s.socks_port, s.http_port) == ("127.0.0.1", True, True, 1080, 8080)
    assert (s.username, s.password, s.auth_required) == ("user", "password", True)
    assert s.ziti_identities == () and s.ziti_identity is None
    assert s.fallback == "direct"


def test_each_original_variable():
    s = settings({
        "PROXY_HOST": "::1", "SOCKS_ENABLED": "false", "HTTP_ENABLED": "TRUE", "SOCKS_PORT": "1081",
        "HTTP_PORT": "3128", "PROXY_USERNAME": "ci", "PROXY_PASSWORD": "pw",
        "ZITI_IDENTITIES": " /ids/a.json ; /ids/*.json;; ",
    })
    assert s.proxy_host == "::1" and not s.socks_enabled and s.http_enabled
    assert (s.socks_port, s.http_port, s.username, s.password) == (1081, 3128, "ci", "pw")
    assert s.ziti_identities == ("/ids/a.json", "/ids/*.json")
    assert settings({"ZITI_IDENTITY": "e30="}).ziti_identity == "e30="  # base64 of {}


def test_enrollment_settings():
    s = settings({"ZITI_ENROLL_TOKEN": " eyJ.e30.sig \n", "ZEP_ENROLL_IDENTITY_OUT": "/ids/ci.json"})
    assert (s.enroll_token, s.enroll_identity_out, s.ziti_configured) == ("eyJ.e30.sig", "/ids/ci.json", True)
    assert "eyJ" not in repr(s)
    s = settings({"ZEP_ENROLL_TOKEN_FILE": "/env.jwt"}, "--enroll-token-file", "/run/ci.jwt",
                 "--enroll-identity-out", "out.json")
    assert (s.enroll_token_file, s.enroll_identity_out, s.enrolls) == ("/run/ci.jwt", "out.json", True)
    assert settings({"ZEP_ENROLL_TOKEN_FILE": "-"}).enroll_token_file == "-"
    with pytest.raises(SystemExit):  # a token never goes on a command line (nor is this --enroll-token-file)
        settings({}, "--enroll-token", "eyJ.e30.sig")


def test_a_token_on_the_command_line_is_refused_without_repeating_it():
    for args in (["--enroll-token", "eyJhbGciOiJSUzI1NiJ9.e30.c2VjcmV0"], ["--enroll-token=eyJhbGciOiJSUzI1NiJ9.e30.c2VjcmV0"],
                 ["--enroll-token-file", "eyJhbGciOiJSUzI1NiJ9.e30.c2VjcmV0"]):
        result = run_zep("serve", *args)
        assert result.returncode == 2
        assert "c2VjcmV0" not in result.stderr and "eyJhbGci" not in result.stderr
        assert "ZITI_ENROLL_TOKEN" in result.stderr.splitlines()[-1]


def test_empty_credentials_turn_authentication_off():
    assert not settings({"PROXY_USERNAME": "", "PROXY_PASSWORD": ""}, "--direct").auth_required


def test_zep_variables():
    s = settings({
        "ZEP_FALLBACK": "deny", "ZEP_TIMEOUT_HANDSHAKE": "2.5", "ZEP_TIMEOUT_CONNECT": "3", "ZEP_TIMEOUT_TUNNEL": "60",
        "ZEP_MAXCONN": "7", "ZEP_LOG_LEVEL": "debug", "ZITI_IDENTITIES": "a.json", "ZEP_ZITI_LOAD_TIMEOUT": "9",
    })
    assert (s.fallback, s.http_request_timeout, s.connect_timeout, s.tunnel_timeout) == ("deny", 2.5, 3.0, 60.0)
    assert (s.max_connections, s.log_level, s.ziti_load_timeout) == (7, "debug", 9.0)
    assert settings({"ZEP_DIRECT": "yes"}).direct


def test_egress_settings():
    s = settings({"ZEP_EGRESS": "allow *.corp.example:443;deny 10.0.0.0/8\nallow *", "ZEP_EGRESS_DEFAULT": "deny"}, "--direct")
    assert s.egress_rules == ("allow *.corp.example:443", "deny 10.0.0.0/8", "allow *")
    assert s.egress_default == "deny" and not s.egress_policy().default_allow
    flags = settings({"ZEP_EGRESS": "deny *"}, "--direct", "--egress", "allow a.example", "--egress", "deny *",
                     "--egress-default", "allow")
    assert flags.egress_rules == ("allow a.example", "deny *") and flags.egress_policy().default_allow


def test_named_timeouts_defaults_variables_and_flags():
    s = settings({}, "--direct")
    assert (s.http_request_timeout, s.http_keep_alive_timeout, s.client_timeout, s.server_timeout,
            s.connect_timeout, s.tunnel_timeout, s.drain_timeout) == (10, 10, 60, 60, 10, 600, 25)
    s = settings({"ZEP_TIMEOUT_HTTP_REQUEST": "1", "ZEP_TIMEOUT_HTTP_KEEP_ALIVE": "2", "ZEP_TIMEOUT_CLIENT": "3",
                  "ZEP_TIMEOUT_SERVER": "4", "ZEP_TIMEOUT_CONNECT": "5", "ZEP_TIMEOUT_TUNNEL": "6",
                  "ZEP_DRAIN_TIMEOUT": "0", "ZEP_LOG_FORMAT": "json"}, "--direct")
    assert (s.http_request_timeout, s.http_keep_alive_timeout, s.client_timeout, s.server_timeout,
            s.connect_timeout, s.tunnel_timeout, s.drain_timeout, s.log_format) == (1, 2, 3, 4, 5, 6, 0, "json")
    s = settings({}, "--direct", "--timeout-http-request", "1", "--timeout-http-keep-alive", "2", "--timeout-client",
                 "3", "--timeout-server", "4", "--timeout-connect", "5", "--timeout-tunnel", "6", "--drain-timeout",
                 "7", "--log-format", "json")
    assert (s.http_request_timeout, s.http_keep_alive_timeout, s.client_timeout, s.server_timeout,
            s.connect_timeout, s.tunnel_timeout, s.drain_timeout, s.log_format) == (1, 2, 3, 4, 5, 6, 7, "json")


def test_old_timeout_names_are_aliases():
    s = settings({"ZEP_TIMEOUT_HANDSHAKE": "2"}, "--direct")
    assert s.http_request_timeout == 2
    assert settings({"ZEP_TIMEOUT_HANDSHAKE": "2", "ZEP_TIMEOUT_HTTP_REQUEST": "3"}, "--direct").http_request_timeout == 3
    s = settings({}, "--direct", "--handshake-timeout", "1", "--connect-timeout", "2", "--tunnel-timeout", "3")
    assert (s.http_request_timeout, s.connect_timeout, s.tunnel_timeout) == (1, 2, 3)


def test_flags_win_over_environment():
    s = settings({"SOCKS_PORT": "1081", "ZEP_FALLBACK": "deny", "SOCKS_ENABLED": "false", "PROXY_USERNAME": "env"},
                 "--socks-port", "2000", "--fallback", "direct", "--socks", "--username", "flag", "--direct")
    assert (s.socks_port, s.fallback, s.socks_enabled, s.username) == (2000, "direct", True, "flag")
    assert settings({}, "--identity", "a.json", "--identity", "b/*.json").ziti_identities == ("a.json", "b/*.json")


def test_upstream_proxy_settings():
    s = settings({"ZEP_UPSTREAM_PROXY": "http://u:pw@corp:3128", "ZEP_UPSTREAM_NO_PROXY": ".corp.example,10.0.0.0/8"},
                 "--direct")
    assert s.fallback == "proxy"  # an upstream proxy makes `proxy` the default fallback
    upstream = s.upstream()
    assert (upstream.label, upstream.username, upstream.password) == ("http://corp:3128", "u", "pw")
    assert upstream.no_proxy.matches("git.corp.example", 443) and "pw" not in repr(s)
    assert settings({"ZEP_UPSTREAM_PROXY": "http://corp:3128", "ZEP_FALLBACK": "direct"}, "--direct").fallback == "direct"
    flags = settings({}, "--direct", "--upstream-proxy", "socks5h://gw:1080", "--upstream-no-proxy", "*")
    assert flags.fallback == "proxy" and flags.upstream().no_proxy.everything
    assert settings({}, "--direct").upstream() is None


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"SOCKS_PORT": "70000"}, [], "SOCKS_PORT must be a port from 0 to 65535"),
    ({}, ["--http-port", "-1"], "--http-port must be a port"),
    ({"HTTP_PORT": "eighty"}, [], "HTTP_PORT must be a whole number"),
    ({"SOCKS_ENABLED": "maybe"}, [], "SOCKS_ENABLED must be true or false"),
    ({"SOCKS_ENABLED": "false", "HTTP_ENABLED": "0"}, [], "both false"),
    ({"SOCKS_PORT": "9000", "HTTP_PORT": "9000"}, [], "SOCKS_PORT and HTTP_PORT are both 9000"),
    ({"ZITI_IDENTITIES": "a.json", "ZITI_IDENTITY": "e30="}, [], "ZITI_IDENTITY and ZITI_IDENTITIES are both set"),
    ({"ZEP_FALLBACK": "maybe"}, [], "ZEP_FALLBACK must be direct, deny or proxy"),
    ({"ZEP_TIMEOUT_CONNECT": "0"}, [], "ZEP_TIMEOUT_CONNECT must be more than 0"),
    ({"ZEP_EGRESS": "allow *; deny 10.0.0.0/33"}, [], 'ZEP_EGRESS: egress rule 2 "deny 10.0.0.0/33": '),
    ({}, ["--egress", "allow *", "--egress", "block x"], '--egress: egress rule 2 "block x": the action'),
    ({"ZEP_EGRESS_DEFAULT": "block"}, [], "ZEP_EGRESS_DEFAULT must be allow or deny"),
    ({"ZEP_FALLBACK": "deny"}, [], "would reach nothing"),
    ({"ZEP_FALLBACK": "proxy"}, [], "ZEP_FALLBACK=proxy needs an upstream proxy"),
    ({"ZEP_UPSTREAM_PROXY": "ftp://h:1"}, [], "ZEP_UPSTREAM_PROXY: the upstream proxy must be"),
    ({}, ["--upstream-proxy", "http://h:x"], "--upstream-proxy: the upstream proxy URL is malformed"),
    ({}, ["--upstream-proxy", "http://u:pw@h:3128"], "--upstream-proxy must not carry a password"),
    ({"ZEP_UPSTREAM_PROXY": "http://h:1", "ZEP_UPSTREAM_NO_PROXY": "a:b"}, [], "ZEP_UPSTREAM_NO_PROXY: no-proxy entry"),
    ({"ZEP_TIMEOUT_HANDSHAKE": "-1"}, [], "ZEP_TIMEOUT_HANDSHAKE must be more than 0"),
    ({}, ["--timeout-client", "0"], "--timeout-client must be more than 0"),
    ({"ZEP_TIMEOUT_SERVER": "soon"}, [], "ZEP_TIMEOUT_SERVER must be a number of seconds"),
    ({"ZEP_TIMEOUT_HTTP_KEEP_ALIVE": "0"}, [], "ZEP_TIMEOUT_HTTP_KEEP_ALIVE must be more than 0"),
    ({"ZEP_DRAIN_TIMEOUT": "-1"}, [], "ZEP_DRAIN_TIMEOUT must be 0 seconds or more"),
    ({"ZEP_LOG_FORMAT": "xml"}, [], "ZEP_LOG_FORMAT must be logfmt or json"),
    ({"ZEP_MAXCONN": "-1"}, [], "ZEP_MAXCONN must be 0 or more"),
    ({"PROXY_USERNAME": "only-user", "PROXY_PASSWORD": ""}, [], "must be set together"),
    ({"PROXY_HOST": "0.0.0.0"}, [], "reachable from other machines"),
    ({"PROXY_HOST": "0.0.0.0", "PROXY_USERNAME": "", "PROXY_PASSWORD": ""}, [], "no authentication"),
    ({"ZITI_ENROLL_TOKEN": "t", "ZEP_ENROLL_TOKEN_FILE": "t.jwt"}, [],
     "ZITI_ENROLL_TOKEN and ZEP_ENROLL_TOKEN_FILE are both set: use one"),
    ({"ZEP_ENROLL_IDENTITY_OUT": "id.json"}, [], "ZEP_ENROLL_IDENTITY_OUT is set but there is no enrollment token"),
    ({"ZEP_WORKERS": "0"}, [], "ZEP_WORKERS must be auto or a number from 1 to 1024, not 0"),
    ({}, ["--workers", "many"], "--workers must be auto or a whole number, not 'many'"),
    ({"ZITI_ENROLL_TOKEN": "t", "ZEP_WORKERS": "2"}, [], "ZEP_WORKERS=2: workers cannot enroll"),
])
def test_invalid_values_name_the_variable(env, args, message):
    with pytest.raises(ConfigError, match=message):
        settings(env, "--direct", *args)


def test_workers_one_by_default_a_number_or_auto():
    assert settings({}, "--direct").workers == 1
    assert settings({"ZEP_WORKERS": "3"}, "--direct").workers == 3
    assert settings({"ZEP_WORKERS": "3"}, "--direct", "--workers", "AUTO").workers == available_cpus()
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_non_loopback_bind_needs_real_credentials_or_allow_remote():
    assert settings({"PROXY_HOST": "0.0.0.0", "PROXY_USERNAME": "ci", "PROXY_PASSWORD": "long-secret"}, "--direct")
    assert settings({"PROXY_HOST": "0.0.0.0"}, "--direct", "--allow-remote").allow_remote
    assert settings({"PROXY_HOST": "0.0.0.0", "ZEP_ALLOW_REMOTE": "true"}, "--direct").allow_remote


def test_no_identity_and_no_direct_is_refused():
    with pytest.raises(ConfigError, match="pass --direct"):
        settings({})


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"SOCKS_PORT": "99999"}, ["--direct"], "SOCKS_PORT must be a port"),
    ({}, [], "no Ziti identity configured"),
    ({"ZEP_EGRESS": "allow *:99999"}, ["--direct"], 'ZEP_EGRESS: egress rule 1 "allow *:99999"'),
    ({"PROXY_HOST": "0.0.0.0", "PROXY_USERNAME": "user", "PROXY_PASSWORD": "password"}, ["--direct"], "default credentials"),
])
def test_cli_exits_2_with_one_line(env, args, message):
    result = run_zep("serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zep: error: ") and message in lines[0]


def test_port_in_use_exits_2(tmp_path):
    with start_zep("--direct") as zp:
        result = run_zep("serve", "--direct", "--socks-port", str(zp.socks_port), "--http-port", "0")
    assert result.returncode == 2
    assert "address in use" in result.stderr


def test_credentials_never_logged():
    with start_zep("--direct", "--log-level", "debug", env={"PROXY_USERNAME": "alice", "PROXY_PASSWORD": "hunter2-secret"}) as zp:
        zp.wait_for_log("authentication required")
    assert "hunter2-secret" not in zp.log_text()


def test_only_one_listener_when_the_other_is_disabled():
    with start_zep("--direct", env={"HTTP_ENABLED": "false"}) as zp:
        assert zp.socks_port and zp.http_port is None


def test_version_names_the_relay():
    result = run_zep("version")
    assert result.returncode == 0
    assert result.stdout.startswith("zep ")
    assert "relay: " in result.stdout


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9090", ("127.0.0.1", 9090)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:9090", ("localhost", 9090)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_admin_address_is_host_and_port(text, expected):
    assert split_host_port(text) == expected
    assert settings({"ZEP_ADMIN_ADDRESS": text}, "--direct").admin_address == text


@pytest.mark.parametrize("text", ["9090", ":9090", "::1:9090", "host:", "host:http", "host:70000", "[::1]"])
def test_admin_address_without_host_or_port_is_refused(text):
    with pytest.raises(ConfigError, match="--admin must be HOST:PORT"):
        settings({}, "--direct", "--admin", text)


def test_a_tenants_file_needs_no_global_identity_or_credentials():
    s = settings({"ZEP_TENANTS": " /etc/zep/tenants.toml ", "PROXY_HOST": "0.0.0.0", "PROXY_USERNAME": "",
                  "PROXY_PASSWORD": ""})
    assert s.tenants == "/etc/zep/tenants.toml"  # each tenant authenticates with its own hash
    assert settings({}, "--tenants", "t.toml").tenants == "t.toml"


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"ZITI_IDENTITIES": "a.json"}, [], "ZITI_IDENTITIES is set, but with ZEP_TENANTS each tenant has its own"),
    ({"ZITI_IDENTITY": "e30="}, [], "ZITI_IDENTITY is set, but with ZEP_TENANTS"),
    ({"ZITI_ENROLL_TOKEN": "t"}, [], "ZITI_ENROLL_TOKEN is set, but with ZEP_TENANTS"),
    ({"PROXY_USERNAME": "ci", "PROXY_PASSWORD": "pw"}, [], "PROXY_USERNAME is set, but with ZEP_TENANTS"),
    ({}, ["--password", "pw", "--username", ""], "--password is set, but with ZEP_TENANTS"),
    ({}, ["--direct"], "--direct and ZEP_TENANTS are both set"),
    ({"ZEP_NO_AUTH": "1"}, [], "ZEP_NO_AUTH is set, but with ZEP_TENANTS"),
    ({"ZEP_WORKERS": "2"}, [], "ZEP_WORKERS=2 and ZEP_TENANTS are both set"),
    ({"ZEP_MAX_HEAD_BYTES": "200000"}, [], "ZEP_MAX_HEAD_BYTES must be at most 131072 with ZEP_TENANTS"),
])
def test_global_identities_or_credentials_beside_tenants_are_refused(env, args, message):
    with pytest.raises(ConfigError, match=message):
        settings({"ZEP_TENANTS": "t.toml", **env}, *args)
