"""Settings: one frozen value built from the environment and the command line, validated here.

Precedence: command-line flag, then `ZEP_*` / the original ziti-edge-proxy variables, then defaults.
Every problem is a `ConfigError` whose message names the variable or flag at fault.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any

from zep.egress import ACTIONS as EGRESS_DEFAULTS
from zep.egress import EgressPolicy, split_rules
from zep.errors import ConfigError
from zep.upstream import NoProxy, UpstreamProxy

DEFAULT_USERNAME = "user"
DEFAULT_PASSWORD = "password"
FALLBACK_POLICIES = ("direct", "deny", "proxy")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
MAX_WORKERS = 1024
MAX_TENANT_HEAD_BYTES = 128 * 1024  # with what one read brings behind it, within a hand-off (zep.handoff)


@dataclass(frozen=True)
class Settings:
    proxy_host: str = "127.0.0.1"
    socks_enabled: bool = True
    http_enabled: bool = True
    socks_port: int = 1080
    http_port: int = 8080
    username: str = DEFAULT_USERNAME
    password: str = DEFAULT_PASSWORD
    no_auth: bool = False
    random_credentials: bool = False
    ziti_identities: tuple[str, ...] = ()
    ziti_identity: str | None = field(default=None, repr=False)
    fallback: str = "direct"
    egress_rules: tuple[str, ...] = ()
    egress_default: str = "allow"
    upstream_proxy: str | None = field(default=None, repr=False)  # may carry credentials
    upstream_no_proxy: str = ""
    direct: bool = False
    allow_remote: bool = False
    dumpable: bool = False
    # The named timeouts (HAProxy's names; see zep.exchange and the README).
    http_request_timeout: float = 10.0
    http_keep_alive_timeout: float = 10.0
    client_timeout: float = 60.0
    server_timeout: float = 60.0
    connect_timeout: float = 10.0
    tunnel_timeout: float = 600.0
    drain_timeout: float = 25.0
    max_connections: int = 0  # 0: as many as the open-files limit carries (fdlimit)
    max_head_bytes: int = 65536
    fast_path: bool = True  # SOCKS5 and CONNECT on loop callbacks (zep.fastpath); off: the coroutine driver
    native_socks: bool = True  # SOCKS5 handshakes and direct dials in the compiled engine (zep.nativepath)
    ziti_load_timeout: float = 30.0
    ziti_service_suffix: str = ".ziti"
    log_level: str = "info"
    log_format: str = "logfmt"
    ready_file: str | None = None
    enroll_token: str | None = field(default=None, repr=False)
    enroll_token_file: str | None = None
    enroll_identity_out: str | None = None
    no_proxy: tuple[str, ...] = ()
    admin_address: str | None = None  # "HOST:PORT" of the admin listener; None: off
    workers: int = 1  # `zep serve` processes serving the listeners; 1: this process serves them itself
    tenants: str | None = None  # the tenants file: one front process and a worker per tenant (zep.tenancy)

    @property
    def auth_required(self) -> bool:
        return not self.no_auth and bool(self.username and self.password)

    @property
    def enrolls(self) -> bool:
        return bool(self.enroll_token or self.enroll_token_file)

    @property
    def ziti_configured(self) -> bool:
        return bool(self.ziti_identities or self.ziti_identity or self.enrolls)

    def egress_policy(self) -> EgressPolicy:
        return EgressPolicy.parse(self.egress_rules, self.egress_default)

    def upstream(self) -> UpstreamProxy | None:
        if not self.upstream_proxy:
            return None
        return UpstreamProxy.parse(self.upstream_proxy, self.upstream_no_proxy)


# Setting name -> environment variable, for the values that come from the environment.
ENVIRONMENT = {
    "proxy_host": "PROXY_HOST",
    "socks_enabled": "SOCKS_ENABLED",
    "http_enabled": "HTTP_ENABLED",
    "socks_port": "SOCKS_PORT",
    "http_port": "HTTP_PORT",
    "username": "PROXY_USERNAME",
    "password": "PROXY_PASSWORD",
    "no_auth": "ZEP_NO_AUTH",
    "random_credentials": "ZEP_RANDOM_CREDENTIALS",
    "ziti_identities": "ZITI_IDENTITIES",
    "ziti_identity": "ZITI_IDENTITY",
    "fallback": "ZEP_FALLBACK",
    "egress_rules": "ZEP_EGRESS",
    "egress_default": "ZEP_EGRESS_DEFAULT",
    "upstream_proxy": "ZEP_UPSTREAM_PROXY",
    "upstream_no_proxy": "ZEP_UPSTREAM_NO_PROXY",
    "direct": "ZEP_DIRECT",
    "allow_remote": "ZEP_ALLOW_REMOTE",
    "dumpable": "ZEP_DUMPABLE",
    "http_request_timeout": "ZEP_TIMEOUT_HTTP_REQUEST",
    "http_keep_alive_timeout": "ZEP_TIMEOUT_HTTP_KEEP_ALIVE",
    "client_timeout": "ZEP_TIMEOUT_CLIENT",
    "server_timeout": "ZEP_TIMEOUT_SERVER",
    "connect_timeout": "ZEP_TIMEOUT_CONNECT",
    "tunnel_timeout": "ZEP_TIMEOUT_TUNNEL",
    "drain_timeout": "ZEP_DRAIN_TIMEOUT",
    "max_connections": "ZEP_MAXCONN",
    "max_head_bytes": "ZEP_MAX_HEAD_BYTES",
    "fast_path": "ZEP_FAST_PATH",
    "native_socks": "ZEP_NATIVE_SOCKS",
    "ziti_load_timeout": "ZEP_ZITI_LOAD_TIMEOUT",
    "ziti_service_suffix": "ZEP_ZITI_SERVICE_SUFFIX",
    "log_level": "ZEP_LOG_LEVEL",
    "log_format": "ZEP_LOG_FORMAT",
    "ready_file": "ZEP_READY_FILE",
    "enroll_token": "ZITI_ENROLL_TOKEN",
    "enroll_token_file": "ZEP_ENROLL_TOKEN_FILE",
    "enroll_identity_out": "ZEP_ENROLL_IDENTITY_OUT",
    "no_proxy": "ZEP_NO_PROXY",
    "admin_address": "ZEP_ADMIN_ADDRESS",
    "workers": "ZEP_WORKERS",
    "tenants": "ZEP_TENANTS",
}

# Setting name -> the variable naming a file that holds its value instead (a mounted Docker or
# Kubernetes secret, as official images read them). Setting both is an error; an empty one is unset.
SECRET_FILES = {
    "username": "PROXY_USERNAME_FILE",
    "password": "PROXY_PASSWORD_FILE",
    "ziti_identity": "ZITI_IDENTITY_FILE",
}
SECRET_FILE_LIMIT = 1 << 20  # an identity is a few KiB; this bounds a mistaken path like /dev/zero

# Setting name -> command-line flag, used to name the culprit in error messages.
FLAGS = {name: "--" + name.replace("_", "-") for name in ENVIRONMENT}
FLAGS.update(
    proxy_host="--host",
    username="--username",
    password="--password",
    ziti_identities="--identity",
    egress_rules="--egress",
    http_request_timeout="--timeout-http-request",
    http_keep_alive_timeout="--timeout-http-keep-alive",
    client_timeout="--timeout-client",
    server_timeout="--timeout-server",
    connect_timeout="--timeout-connect",
    tunnel_timeout="--timeout-tunnel",
    max_connections="--maxconn",
    socks_enabled="--socks",
    http_enabled="--http",
    admin_address="--admin",
)
del FLAGS["enroll_token"]  # never a flag: everyone can read a process's command line

# Settings that take one of a few words: matched without regard to case (DEBUG, Deny).
CHOICES = {"fallback": FALLBACK_POLICIES, "egress_default": EGRESS_DEFAULTS, "log_level": LOG_LEVELS,
           "log_format": LOG_FORMATS}

# Older names that keep working; the name above wins when both are given.
ENVIRONMENT_ALIASES = {"http_request_timeout": "ZEP_TIMEOUT_HANDSHAKE"}
FLAG_ALIASES = {
    "http_request_timeout": ("--handshake-timeout",),
    "connect_timeout": ("--connect-timeout",),
    "tunnel_timeout": ("--tunnel-timeout",),
}
TIMEOUTS = ("http_request_timeout", "http_keep_alive_timeout", "client_timeout", "server_timeout",
            "connect_timeout", "tunnel_timeout")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_settings(environ: Mapping[str, str], flags: Mapping[str, Any], defaults: Settings | None = None) -> Settings:
    """Build Settings from environment variables and parsed flags (None means: flag not given).

    `defaults` replaces the built-in defaults (`zep run` picks free ports and random credentials).
    Random credentials that are only a default yield to credentials given or to --no-auth.
    """
    defaults = defaults or Settings()
    values: dict[str, Any] = {}
    given: set[str] = set()
    for f in fields(Settings):
        flag_value = flags.get(f.name)
        if flag_value is not None:
            values[f.name] = _from_flag(f.name, flag_value)
            given.add(f.name)
        elif _secret_file(f.name, environ):
            values[f.name] = _from_text(f.name, _read_secret_file(f.name, environ), SECRET_FILES[f.name])
            given.add(f.name)
        elif (variable := _variable(f.name, environ)) is not None:
            values[f.name] = _from_text(f.name, environ[variable], variable)
            given.add(f.name)
        else:
            values[f.name] = getattr(defaults, f.name)
    if values["upstream_proxy"] and _source_given("fallback", environ, flags) is None:
        values["fallback"] = "proxy"  # an upstream proxy is there to be used
    if "random_credentials" not in given and (
            values["no_auth"] or any(values[name] for name in ("username", "password") if name in given)):
        values["random_credentials"] = False
    settings = Settings(**values)
    _validate(settings, environ, flags)
    return settings


def _variable(name: str, environ: Mapping[str, str]) -> str | None:
    """The environment variable that sets `name`, if any is set."""
    for variable in (ENVIRONMENT.get(name), ENVIRONMENT_ALIASES.get(name)):
        if variable is not None and variable in environ:
            return variable
    return None


def forget_secret_files(environ: MutableMapping[str, str]) -> None:
    """Once settings are loaded, nothing zep starts needs to learn where its secrets are."""
    for variable in SECRET_FILES.values():
        environ.pop(variable, None)


def _secret_file(name: str, environ: Mapping[str, str]) -> str | None:
    """The path in the setting's `*_FILE` variable, if set; setting the plain variable too is an error."""
    variable = SECRET_FILES.get(name)
    path = environ.get(variable, "") if variable else ""
    if not path:
        return None
    plain = _variable(name, environ)
    if plain and environ[plain]:
        raise ConfigError(f"{plain} and {variable} are both set: use one")
    return path


def _read_secret_file(name: str, environ: Mapping[str, str]) -> str:
    """The file's text without its trailing newline; the message names the file, never its content."""
    variable, path = SECRET_FILES[name], environ[SECRET_FILES[name]]
    try:
        with open(path, "rb") as secret:
            data = secret.read(SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{variable}={path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > SECRET_FILE_LIMIT:
        raise ConfigError(f"{variable}={path} is larger than {SECRET_FILE_LIMIT >> 20} MiB")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}={path} is not UTF-8 text") from None


def _from_flag(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return _from_text(name, value, FLAGS[name])
    if name == "ziti_identities":
        return _identity_entries(";".join(value))
    if name == "egress_rules":
        return tuple(rule.strip() for rule in value if rule.strip())
    if name == "no_proxy":
        return host_list(",".join(value))
    return value


def _from_text(name: str, text: str, source: str) -> Any:
    kind = type(getattr(Settings(), name))
    if name == "ziti_identities":
        return _identity_entries(text)
    if name == "egress_rules":
        return tuple(split_rules(text))
    if name in ("ziti_identity", "ready_file", "enroll_token", "enroll_token_file", "enroll_identity_out",
                "upstream_proxy", "admin_address", "tenants"):
        return text.strip() or None
    if name == "no_proxy":
        return host_list(text)
    if name in CHOICES:
        return text.strip().lower()
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{source} must be true or false, not {text!r}")
    if name == "workers" and text.strip().lower() == "auto":
        return available_cpus()
    if kind is int:
        try:
            return int(text.strip())
        except ValueError:
            expected = "auto or a whole number" if name == "workers" else "a whole number"
            raise ConfigError(f"{source} must be {expected}, not {text!r}") from None
    if kind is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(f"{source} must be a number of seconds, not {text!r}") from None
    return text.strip() if name not in ("username", "password") else text


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset and cpuset cgroups narrow it)."""
    return len(os.sched_getaffinity(0))


def _identity_entries(text: str) -> tuple[str, ...]:
    return tuple(entry.strip() for entry in text.split(";") if entry.strip())


def host_list(text: str) -> tuple[str, ...]:
    """`a.corp, .svc ,b` -> ("a.corp", ".svc", "b"): a NO_PROXY-style comma-separated list."""
    return tuple(entry.strip() for entry in text.split(",") if entry.strip())


def _source(name: str, environ: Mapping[str, str], flags: Mapping[str, Any]) -> str:
    return _source_given(name, environ, flags) or ENVIRONMENT.get(name) or FLAGS[name]


def _source_given(name: str, environ: Mapping[str, str], flags: Mapping[str, Any]) -> str | None:
    """The flag or variable that set `name`; None when it has its default."""
    if flags.get(name) is not None:
        return FLAGS[name]
    if name in SECRET_FILES and environ.get(SECRET_FILES[name]):
        return SECRET_FILES[name]
    return _variable(name, environ)


def _validate(s: Settings, environ: Mapping[str, str], flags: Mapping[str, Any]) -> None:
    def where(name: str) -> str:
        return _source(name, environ, flags)

    for name in ("socks_port", "http_port"):
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{where(name)} must be a port from 0 to 65535, not {port}")
    if not (s.socks_enabled or s.http_enabled):
        raise ConfigError("SOCKS_ENABLED and HTTP_ENABLED are both false: nothing to serve")
    if s.socks_enabled and s.http_enabled and s.socks_port == s.http_port != 0:
        raise ConfigError(f"{where('socks_port')} and {where('http_port')} are both {s.socks_port}")
    if s.ziti_identities and s.ziti_identity:
        raise ConfigError(f"{where('ziti_identity')} and ZITI_IDENTITIES are both set: use one")
    if s.ziti_identity:
        _check_identity_text(s.ziti_identity, where("ziti_identity"))
    if s.enroll_token and s.enroll_token_file:
        raise ConfigError(f"ZITI_ENROLL_TOKEN and {where('enroll_token_file')} are both set: use one")
    if s.workers > 1 and s.enrolls:
        raise ConfigError(f"{where('workers')}={s.workers}: workers cannot enroll, each would spend the one-time "
                          "token; enroll first (zep enroll --jwt FILE -o identity.json), then pass --identity")
    if s.enroll_identity_out and not s.enrolls:
        raise ConfigError(f"{where('enroll_identity_out')} is set but there is no enrollment token "
                          "(ZITI_ENROLL_TOKEN or --enroll-token-file)")
    for name, choices in CHOICES.items():
        if getattr(s, name) not in choices:
            words = f"{', '.join(choices[:-1])} or {choices[-1]}"
            raise ConfigError(f"{where(name)} must be {words} (in any case), not {getattr(s, name)!r}")
    if s.tenants:
        _validate_tenants(s, where)
    _check_parses(where("upstream_no_proxy"), NoProxy.parse, s.upstream_no_proxy)
    _check_parses(where("upstream_proxy"), s.upstream)
    if flags.get("upstream_proxy") is not None and (upstream := s.upstream()) is not None and upstream.password:
        raise ConfigError("--upstream-proxy must not carry a password: every user can read a command line; "
                          "put the URL in ZEP_UPSTREAM_PROXY")
    if s.fallback == "proxy" and not s.upstream_proxy:
        raise ConfigError(f"{where('fallback')}=proxy needs an upstream proxy: set ZEP_UPSTREAM_PROXY or --upstream-proxy")
    _check_parses(where("egress_rules"), s.egress_policy)
    for name in (*TIMEOUTS, "ziti_load_timeout"):
        if not getattr(s, name) > 0:
            raise ConfigError(f"{where(name)} must be more than 0 seconds")
    if not s.drain_timeout >= 0:
        raise ConfigError(f"{where('drain_timeout')} must be 0 seconds or more")
    if not 1 <= s.workers <= MAX_WORKERS:
        raise ConfigError(f"{where('workers')} must be auto or a number from 1 to {MAX_WORKERS}, not {s.workers}")
    if s.max_connections < 0:
        raise ConfigError(f"{where('max_connections')} must be 0 or more (0: fit the open-files limit)")
    if s.max_head_bytes < 1024:
        raise ConfigError(f"{where('max_head_bytes')} must be at least 1024")
    if s.admin_address is not None:
        try:
            split_host_port(s.admin_address)
        except ValueError as exc:
            raise ConfigError(f"{where('admin_address')} must be HOST:PORT (for example 127.0.0.1:9090): {exc}") from None
    if s.tenants:
        return  # each tenant brings its identities and a hashed password (checked in zep.tenants)
    given = [name for name in ("username", "password")
             if getattr(s, name) and _source_given(name, environ, flags) is not None]
    if s.no_auth and s.random_credentials:
        raise ConfigError(f"{where('no_auth')} and {where('random_credentials')} contradict each other: pick one")
    for switch in ("no_auth", "random_credentials"):
        if getattr(s, switch) and given:
            raise ConfigError(f"{where(switch)} and {where(given[0])} are both given: drop one of them")
    if not (s.no_auth or s.random_credentials) and bool(s.username) != bool(s.password):
        raise ConfigError(f"{where('username')} and {where('password')} must be set together "
                          "(or both empty for no authentication)")
    if s.direct and s.fallback == "deny":
        raise ConfigError(f"--direct (ZEP_DIRECT) with {where('fallback')}=deny would reach nothing: "
                          "every destination takes the fallback route")
    if not s.ziti_configured and not s.direct:
        raise ConfigError(
            "no Ziti identity configured (ZITI_IDENTITIES, ZITI_IDENTITY or ZITI_ENROLL_TOKEN): "
            "pass --direct to dial every destination directly"
        )
    if not _is_loopback(s.proxy_host, where("proxy_host")) and not s.allow_remote:
        default = (s.username, s.password) == (DEFAULT_USERNAME, DEFAULT_PASSWORD) and not s.random_credentials
        weak = "no authentication" if not (s.auth_required or s.random_credentials) else (
            "the default credentials" if default else "")
        if weak:
            raise ConfigError(
                f"{where('proxy_host')}={s.proxy_host} is reachable from other machines and zep would accept "
                f"{weak}: set PROXY_USERNAME and PROXY_PASSWORD (or PROXY_PASSWORD_FILE, a file holding the "
                "password), or ZEP_ALLOW_REMOTE=true / --allow-remote if you mean it"
            )


def _check_parses(source: str, parse: Callable[..., object], *args: object) -> None:
    """Run a value's parser; its ConfigError gets the name of the variable or flag in front."""
    try:
        parse(*args)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_identity_text(text: str, source: str) -> None:
    """The identity JSON or its base64, told apart and checked here so a bad secret fails before start-up."""
    from zep.ziti import ZitiSetupError, decode_identity  # no SDK import: decoding is plain Python

    try:
        decode_identity(text, source)
    except ZitiSetupError as exc:
        raise ConfigError(str(exc)) from None


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:9090`, `[::1]:9090`, `localhost:0` -> (host, port); ValueError says what is wrong."""
    host, colon, port_text = text.strip().rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r} has no host")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has no port from 0 to 65535")
    return host, int(port_text)


def _validate_tenants(s: Settings, where: Callable[[str], str]) -> None:
    """With a tenants file, identities and credentials are the tenants': a global one is a mistake."""
    for name in ("ziti_identities", "ziti_identity", "enroll_token", "enroll_token_file", "username", "password",
                 "no_auth", "random_credentials"):
        if getattr(s, name) and getattr(s, name) != getattr(Settings(), name):
            raise ConfigError(f"{where(name)} is set, but with {where('tenants')} each tenant has its own "
                              "identities and password (see the tenants file)")
    if s.direct:
        raise ConfigError(f"{where('direct')} and {where('tenants')} are both set: give the tenants "
                          "fallback = \"direct\" instead")
    if s.workers > 1:
        raise ConfigError(f"{where('workers')}={s.workers} and {where('tenants')} are both set: with tenants, "
                          "zep runs one worker per tenant")
    if s.max_head_bytes > MAX_TENANT_HEAD_BYTES:
        raise ConfigError(f"{where('max_head_bytes')} must be at most {MAX_TENANT_HEAD_BYTES} with "
                          f"{where('tenants')}: a request head travels to its tenant's worker in one message")


def _is_loopback(host: str, source: str) -> bool:
    """Whether every address `host` stands for is a loopback one; a name must resolve."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(f"{source}={host} does not resolve to an address to listen on ({reason}): "
                          "give an IP address, such as 127.0.0.1 or ::1") from None
    return all(ipaddress.ip_address(info[4][0].partition("%")[0]).is_loopback for info in infos)
