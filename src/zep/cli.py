"""Command line: `zep serve` runs the proxy, `zep run -- CMD` runs one command with a private proxy,
`zep env` prints the proxy variables of a running zep, `zep enroll` turns a one-time token into an
identity file, `zep version` says what would run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

import zep
from zep import readyfile
from zep.config import (
    CHOICES,
    ENVIRONMENT,
    ENVIRONMENT_ALIASES,
    FLAG_ALIASES,
    FLAGS,
    ConfigError,
    Settings,
    forget_secret_files,
    host_list,
    load_settings,
)
from zep.jobenv import FORMATS
from zep.readyfile import Ready

EXIT_CONFIG = 2
EXIT_USAGE = 2
VERSION = f"zep {zep.__version__} (ziti-edge-proxy)"
# `zep run`: a free port for each listener, credentials made for this run, a quiet log (the summary says it all).
RUN_DEFAULTS = Settings(socks_port=0, http_port=0, random_credentials=True, log_level="warning")
ENV_WAIT_STEP = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zep", description=__doc__)
    parser.add_argument("--version", action="version", version=VERSION)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("version", help="print the version, the active relay and the OpenZiti SDK")
    serve = commands.add_parser("serve", help="run the SOCKS5 and HTTP proxy",
                                description="Flags win over environment variables (see README).")
    add_serve_arguments(serve)
    serve.add_argument(FLAGS["workers"], dest="workers", metavar="N|auto",
                       help="worker processes sharing the listeners, auto: one per CPU (ZEP_WORKERS)")
    run = commands.add_parser(
        "run", help="run one command with a private proxy", usage="zep run [serve options] -- CMD [ARGS...]",
        description="Start the proxy on free loopback ports with random credentials, run CMD with "
                    "ALL_PROXY, HTTP(S)_PROXY and NO_PROXY pointing at it, stop when CMD ends, exit with its status.")
    add_serve_arguments(run)
    env = commands.add_parser("env", help="print the proxy variables of a running zep (from its ready file)")
    env.add_argument(FLAGS["ready_file"], dest="ready_file", metavar="PATH",
                     help="the ready file of the running zep (ZEP_READY_FILE)")
    env.add_argument("--format", dest="format", default="sh", type=str.lower,
                     choices=FORMATS,
                     help="sh: export lines (default); github: lines for $GITHUB_ENV; dotenv; json")
    env.add_argument(FLAGS["no_proxy"], dest="no_proxy", action="append", metavar="HOSTS",
                     help="more hosts for NO_PROXY, comma-separated; repeatable (ZEP_NO_PROXY)")
    env.add_argument("--wait", dest="wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for the ready file to appear")
    env.add_argument("--pid", dest="pid", type=int, metavar="PID",
                     help="with --wait: give up as soon as this process (the zep started in the background) exits")
    add_enroll_command(commands)
    hashing = commands.add_parser("hash-password", help="print a salted hash of a password for the tenants file",
                                  description="Reads the password from the terminal (asked twice) or, when "
                                              "stdin is not a terminal, from stdin (one trailing newline is "
                                              "dropped), and prints its scrypt hash for password_hash.")
    hashing.add_argument("password", nargs="*", action=RefuseSecretArgument, help=argparse.SUPPRESS)
    return parser


# Each setting in seconds, with what it bounds (the flag's help).
_SECONDS = {
    "http_request_timeout": "for a whole SOCKS5 handshake or HTTP request head",
    "http_keep_alive_timeout": "a kept-alive HTTP connection may wait for its next request",
    "client_timeout": "of client inactivity while zep waits for it (a request body, reading a response)",
    "server_timeout": "of upstream inactivity while zep waits for it (a response, reading a request body)",
    "connect_timeout": "to connect to a destination",
    "tunnel_timeout": "a tunnel may stay idle",
    "drain_timeout": "open connections may take to finish after SIGTERM",
    "ziti_load_timeout": "to load every Ziti identity",
}


def add_serve_arguments(command: argparse.ArgumentParser) -> None:
    """The proxy's settings as flags (`zep serve`, `zep run`)."""
    flag = FLAGS
    add = command.add_argument
    add(flag["proxy_host"], dest="proxy_host", metavar="ADDRESS", help="listen address (PROXY_HOST)")
    add(flag["socks_port"], dest="socks_port", type=int, metavar="PORT", help="SOCKS5 port, 0 for any (SOCKS_PORT)")
    add(flag["http_port"], dest="http_port", type=int, metavar="PORT", help="HTTP proxy port, 0 for any (HTTP_PORT)")
    add("--socks", dest="socks_enabled", action=argparse.BooleanOptionalAction, help="serve SOCKS5 (SOCKS_ENABLED)")
    add("--http", dest="http_enabled", action=argparse.BooleanOptionalAction, help="serve the HTTP proxy (HTTP_ENABLED)")
    add(flag["username"], dest="username", help="proxy user name (PROXY_USERNAME; empty: no authentication)")
    add(flag["password"], dest="password", help="proxy password (PROXY_PASSWORD)")
    add(flag["no_auth"], dest="no_auth", action="store_true", default=None,
        help="no proxy authentication, whatever the credentials (ZEP_NO_AUTH)")
    add(flag["random_credentials"], dest="random_credentials", action="store_true", default=None,
        help="make up credentials at start; the ready file holds them (ZEP_RANDOM_CREDENTIALS)")
    add(flag["ziti_identities"], dest="ziti_identities", action="append", metavar="PATH",
        help="Ziti identity file or glob; repeatable (ZITI_IDENTITIES)")
    add(flag["fallback"], dest="fallback", type=str.lower, choices=CHOICES["fallback"],
        help="destinations no Ziti service intercepts: dial directly, deny, or go through the "
             "upstream proxy (ZEP_FALLBACK; default proxy when one is set, else direct)")
    add(flag["upstream_proxy"], dest="upstream_proxy", metavar="URL",
        help="http://host:port or socks5h://host:port: the proxy the fallback route 'proxy' goes "
             "through; credentials only in the variable (ZEP_UPSTREAM_PROXY)")
    add(flag["upstream_no_proxy"], dest="upstream_no_proxy", metavar="LIST",
        help="destinations that go direct instead: names, .suffix, *, IPs/CIDRs, host:port "
             "(ZEP_UPSTREAM_NO_PROXY)")
    add(flag["egress_rules"], dest="egress_rules", action="append", metavar="RULE",
        help="egress rule for the fallback route, e.g. 'deny 10.0.0.0/8'; repeatable, "
             "first match wins (ZEP_EGRESS)")
    add(flag["egress_default"], dest="egress_default", type=str.lower, choices=CHOICES["egress_default"],
        help="when no egress rule matches (ZEP_EGRESS_DEFAULT)")
    add(flag["direct"], dest="direct", action="store_true", default=None,
        help="serve without a Ziti identity: every destination takes the fallback route (ZEP_DIRECT)")
    add(flag["allow_remote"], dest="allow_remote", action="store_true", default=None,
        help="allow a non-loopback listen address with default or no credentials (ZEP_ALLOW_REMOTE)")
    add(flag["dumpable"], dest="dumpable", action="store_true", default=None,
        help="stay dumpable, so debuggers and profilers of this user can attach and read zep's memory, "
             "the identity's key included (ZEP_DUMPABLE)")
    for name, meaning in _SECONDS.items():
        variables = " or ".join(v for v in (ENVIRONMENT[name], ENVIRONMENT_ALIASES.get(name)) if v)
        add(flag[name], *FLAG_ALIASES.get(name, ()), dest=name, type=float, metavar="SECONDS",
            help=f"{meaning} ({variables})")
    add(flag["max_connections"], dest="max_connections", type=int, metavar="N",
        help="most concurrent client connections; 0: what the open-files limit carries (ZEP_MAXCONN)")
    add(flag["max_head_bytes"], dest="max_head_bytes", type=int, metavar="BYTES",
        help="largest HTTP request head (ZEP_MAX_HEAD_BYTES)")
    add(flag["fast_path"], dest="fast_path", action=argparse.BooleanOptionalAction,
        help="SOCKS5 and HTTP CONNECT from accept to relay on event-loop callbacks; "
             "--no-fast-path: a coroutine per connection, as for forwarded HTTP (ZEP_FAST_PATH)")
    add(flag["native_socks"], dest="native_socks", action=argparse.BooleanOptionalAction,
        help="with the compiled relay and the fast path: SOCKS5 handshakes and the direct dials of IP "
             "literals run in the relay engine, Python asked only for the route (ZEP_NATIVE_SOCKS)")
    add(flag["ziti_service_suffix"], dest="ziti_service_suffix", metavar="SUFFIX",
        help="host suffix that names a Ziti service directly (ZEP_ZITI_SERVICE_SUFFIX)")
    add(flag["log_level"], dest="log_level", type=str.lower, choices=CHOICES["log_level"], help="(ZEP_LOG_LEVEL)")
    add(flag["log_format"], dest="log_format", type=str.lower, choices=CHOICES["log_format"],
        help="log lines as logfmt or JSON (ZEP_LOG_FORMAT)")
    add(flag["ready_file"], dest="ready_file", metavar="PATH",
        help="write the listening addresses (and credentials) here as JSON once ready (ZEP_READY_FILE)")
    add(flag["admin_address"], dest="admin_address", metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics here; off by default (ZEP_ADMIN_ADDRESS)")
    add(flag["no_proxy"], dest="no_proxy", action="append", metavar="HOSTS",
        help="more hosts for the jobs' NO_PROXY, comma-separated; repeatable (ZEP_NO_PROXY)")
    add(flag["enroll_token_file"], dest="enroll_token_file", metavar="FILE",
        help="enroll with the one-time token in FILE ('-': stdin), then load the new identity "
             "(ZEP_ENROLL_TOKEN_FILE; or the token itself in ZITI_ENROLL_TOKEN)")
    add(flag["enroll_identity_out"], dest="enroll_identity_out", metavar="PATH",
        help="keep the enrolled identity here (mode 0600; loaded instead of enrolling when it "
             "exists); default: a private file removed at exit (ZEP_ENROLL_IDENTITY_OUT)")
    add("--enroll-token", nargs="?", action=RefuseSecretFlag, help=argparse.SUPPRESS)
    add(flag["tenants"], dest="tenants", metavar="FILE",
        help="serve several teams, each in its own worker process (ZEP_TENANTS; see README)")


class RefuseSecretFlag(argparse.Action):
    """A flag that would put a secret on the command line (which every user can read in
    /proc/PID/cmdline): refused without repeating its value; also stops `--enroll-token` from
    being taken as an abbreviation of `--enroll-token-file`."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.error(f"{self.option_strings[0]} is not a flag: a token on the command line is readable by every "
                     "user; put it in ZITI_ENROLL_TOKEN or in a file for --enroll-token-file")


class RefuseSecretArgument(argparse.Action):
    """`zep hash-password SECRET` would put the password on the command line: refused, not repeated."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if values:
            parser.error("the password is not an argument: a command line is readable by every user; "
                         "type it when asked, or pipe it to stdin")


def hash_password_command() -> int:
    """`zep hash-password`: the hash on stdout; the password never on a command line or in a log."""
    import getpass

    from zep.passwords import hash_password, password_from_text

    if sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("zep: error: the two passwords differ", file=sys.stderr)
                return EXIT_CONFIG
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return EXIT_CONFIG
    else:
        password = password_from_text(sys.stdin.read())
    if not password:
        print("zep: error: the password is empty", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return 0


def add_enroll_command(commands: argparse._SubParsersAction) -> None:
    enroll = commands.add_parser("enroll", help="turn a one-time enrollment token into an identity file",
                                 description="Enroll with the controller named in the token and write the "
                                             "identity JSON (mode 0600) for --identity / ZITI_IDENTITIES.")
    enroll.add_argument("--jwt", required=True, metavar="FILE", help="the enrollment token's file; '-' reads stdin")
    enroll.add_argument("-o", "--out", required=True, metavar="PATH", help="where to write the identity")
    enroll.add_argument("--force", action="store_true", help="replace PATH if it exists")
    enroll.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long enrolling may take (default 30)")


def enroll_command(args: argparse.Namespace) -> int:
    """`zep enroll`: one line on stdout when the identity is written, one on stderr when not."""
    from zep import ziti
    from zep.enrollment import EnrollmentError, token_from_file

    configure_logging("warning")
    try:
        if not args.timeout > 0:
            raise EnrollmentError("--timeout must be more than 0 seconds")
        token = token_from_file(args.jwt, "--jwt")
        controller = ziti.enroll_to_file(token, args.out, args.force, args.timeout, "--timeout")
    except (EnrollmentError, ziti.ZitiSetupError) as exc:
        print(f"zep: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"zep: enrolled with {controller}: identity written to {args.out} (mode 0600)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[: argv.index("--") if "--" in argv else None]):
        if "--" not in argv:
            print("zep: error: zep run needs the command after --: zep run [serve options] -- CMD [ARGS...]",
                  file=sys.stderr)
            return EXIT_USAGE
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
        if not command:
            print("zep: error: no command after -- (zep run [serve options] -- CMD [ARGS...])", file=sys.stderr)
            return EXIT_USAGE
    args = build_parser().parse_args(argv)
    if args.command == "version":
        return print_version()
    if args.command == "env":
        return print_env(args)
    if args.command == "enroll":
        return enroll_command(args)
    if args.command == "hash-password":
        return hash_password_command()
    flags = {key: value for key, value in vars(args).items() if key != "command"}
    if args.command == "run" and (flags.get("tenants") or os.environ.get(ENVIRONMENT["tenants"])):
        print(f"zep: error: zep run serves one job with its own identity; {ENVIRONMENT['tenants']} is for zep serve",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = load_settings(os.environ, flags, RUN_DEFAULTS if args.command == "run" else None)
    except ConfigError as exc:
        print(f"zep: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        forget_secret_files(os.environ)
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "run":
        from zep import jobrun

        return jobrun.run(settings, command)
    if settings.tenants:
        from zep.tenancy import serve_tenants

        return serve_tenants(settings)
    if settings.workers > 1:
        from zep.pool import serve_with_workers

        return serve_with_workers(settings)
    from zep.serving import run_proxy

    return run_proxy(settings)


def print_version() -> int:
    from zep import relay, sdkinfo

    print(VERSION)
    print(f"relay: {relay.IMPLEMENTATION} ({relay.WHY})")
    print(sdkinfo.describe())
    return 0


def print_env(args: argparse.Namespace) -> int:
    from zep import jobenv

    path = args.ready_file or os.environ.get(ENVIRONMENT["ready_file"], "").strip()
    if not path:
        print(f"zep: error: which zep? give its ready file with {FLAGS['ready_file']} or {ENVIRONMENT['ready_file']}",
              file=sys.stderr)
        return EXIT_CONFIG
    extra = host_list(",".join(args.no_proxy or [os.environ.get(ENVIRONMENT["no_proxy"], "")]))
    try:
        ready = _wait_for_ready_file(path, args.wait, args.pid)
    except readyfile.ReadyFileError as exc:
        print(f"zep: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(jobenv.render(jobenv.variables(ready, extra), args.format))
    return 0


def _wait_for_ready_file(path: str, wait: float, pid: int | None) -> Ready:
    """The ready file, waiting up to `wait` seconds for it. With `pid`, only that zep's ready file
    will do (never another job's), and the wait ends as soon as that process is gone."""
    deadline = time.monotonic() + wait
    while True:
        try:
            ready = readyfile.read(path)
            if pid is None or ready.pid == pid:
                return ready
            raise readyfile.ReadyFileError(f"the ready file {path} ({readyfile.SETTING}) belongs to another zep "
                                           f"(pid {ready.pid}, not {pid})")
        except readyfile.ReadyFileError:
            if time.monotonic() >= deadline:
                if wait:
                    raise readyfile.ReadyFileError(
                        f"no zep was ready within {wait:g} s: {sys.exc_info()[1]}") from None
                raise
            if pid is not None and not readyfile.zep_is_running(pid):
                raise readyfile.ReadyFileError(
                    f"zep (pid {pid}) exited before it was ready; its ready file was to be {path} "
                    f"({readyfile.SETTING})") from None
        time.sleep(ENV_WAIT_STEP)


def configure_logging(level: str, log_format: str = "logfmt", worker: str | None = None) -> None:
    """A worker process (`zep serve --workers`) tags every line with its id: `worker=ID` first in the
    message (so an access line stays logfmt), or a "worker" field in JSON."""
    from zep import accesslog

    handler = logging.StreamHandler(sys.stderr)
    formatter: TextFormatter | JSONFormatter
    if log_format == "json":
        # One JSON object per line for log shippers: access entries with their own fields, the
        # rest with time, level, logger and message.
        formatter = JSONFormatter(worker)
    else:
        formatter = TextFormatter(f"worker={worker} " if worker else "")
    handler.setFormatter(formatter)
    accesslog.configure(json_lines=log_format == "json", writer=access_writer(handler, formatter.access_line))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # No formatter of zep's prints a record's thread or process: not looking them up saves time on
    # every record (an access line per connection).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def access_writer(handler: logging.StreamHandler, render: Callable[[str], str]) -> Callable[[str], None]:
    """Access lines straight to zep's log handler, as its formatter prints an INFO record of
    `zep.access`, without making the record (one per connection: the record and the handler's
    formatting cost more than the line)."""
    def write(line: str) -> None:
        text = render(line) + handler.terminator
        with handler.lock:
            try:
                handler.stream.write(text)
                handler.stream.flush()
            except (OSError, ValueError):  # the log is gone (a closed pipe): serving goes on, as with logging
                pass
    return write


class TextFormatter(logging.Formatter):
    """zep's log line: time, level, logger, the worker's tag, the message; the time of day
    formatted once a second, not once a line (strftime was a measurable part of each)."""

    def __init__(self, tag: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s %(name)s: {tag}%(message)s")
        self._tag = tag
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time_of_day(record.created, record.msecs)

    def access_line(self, line: str) -> str:
        """What format() gives for an INFO record of `zep.access` with this message, made now."""
        created = time.time()
        return f"{self._time_of_day(created, int((created - int(created)) * 1000))} INFO zep.access: {self._tag}{line}"

    def _time_of_day(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(self.default_time_format, self.converter(second))
        return self.default_msec_format % (self._stamp, msecs)


class JSONFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = {"worker": worker} if worker else {}

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "zep.access":
            return self.access_line(record.getMessage())
        fields = {**self.worker, "time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                  "message": record.getMessage()}
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return json.dumps(fields)

    def access_line(self, line: str) -> str:
        """An access entry's JSON object (the message), with the worker's field first."""
        if self.worker:
            return json.dumps({**self.worker, **json.loads(line)}, separators=(",", ":"))
        return line
