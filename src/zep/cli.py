"""Command line: `zep serve` runs the proxy, `zep enroll` turns a one-time token into an identity
file, `zep version` says what is running and which relay."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import zep
from zep.auth import Credentials
from zep.config import ENVIRONMENT, FALLBACK_POLICIES, FLAGS, LOG_LEVELS, ConfigError, Settings, load_settings
from zep.dial import Dialer
from zep.egress import ACTIONS as EGRESS_DEFAULTS
from zep.proxy_env import remove_self_proxies
from zep.routing import Router, fallback_dialer

log = logging.getLogger("zep")

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("version", help="print the version and the active relay")
    serve = commands.add_parser("serve", help="run the SOCKS5 and HTTP proxy",
                                description="Flags win over environment variables (see README).")
    add_serve_arguments(serve)
    add_enroll_command(commands)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The proxy's settings as flags (`zep serve`, and commands that run the proxy)."""
    flag = FLAGS
    parser.add_argument(flag["proxy_host"], dest="proxy_host", metavar="ADDRESS", help="listen address (PROXY_HOST)")
    parser.add_argument(flag["socks_port"], dest="socks_port", type=int, metavar="PORT", help="SOCKS5 port, 0 for any (SOCKS_PORT)")
    parser.add_argument(flag["http_port"], dest="http_port", type=int, metavar="PORT", help="HTTP proxy port, 0 for any (HTTP_PORT)")
    parser.add_argument("--socks", dest="socks_enabled", action=argparse.BooleanOptionalAction, help="serve SOCKS5 (SOCKS_ENABLED)")
    parser.add_argument("--http", dest="http_enabled", action=argparse.BooleanOptionalAction, help="serve the HTTP proxy (HTTP_ENABLED)")
    parser.add_argument(flag["username"], dest="username", help="proxy user name (PROXY_USERNAME; empty: no authentication)")
    parser.add_argument(flag["password"], dest="password", help="proxy password (PROXY_PASSWORD)")
    parser.add_argument(flag["ziti_identities"], dest="ziti_identities", action="append", metavar="PATH",
                        help="Ziti identity file or glob; repeatable (ZITI_IDENTITIES)")
    parser.add_argument(flag["fallback"], dest="fallback", choices=FALLBACK_POLICIES,
                        help="destinations no Ziti service intercepts: dial directly, deny, or go through the "
                             "upstream proxy (ZEP_FALLBACK; default proxy when one is set, else direct)")
    parser.add_argument(flag["upstream_proxy"], dest="upstream_proxy", metavar="URL",
                        help="http://host:port or socks5h://host:port: the proxy the fallback route 'proxy' goes "
                             "through; credentials only in the variable (ZEP_UPSTREAM_PROXY)")
    parser.add_argument(flag["upstream_no_proxy"], dest="upstream_no_proxy", metavar="LIST",
                        help="destinations that go direct instead: names, .suffix, *, IPs/CIDRs, host:port "
                             "(ZEP_UPSTREAM_NO_PROXY)")
    parser.add_argument(flag["egress_rules"], dest="egress_rules", action="append", metavar="RULE",
                        help="egress rule for the fallback route, e.g. 'deny 10.0.0.0/8'; repeatable, "
                             "first match wins (ZEP_EGRESS)")
    parser.add_argument(flag["egress_default"], dest="egress_default", choices=EGRESS_DEFAULTS,
                        help="when no egress rule matches (ZEP_EGRESS_DEFAULT)")
    parser.add_argument(flag["direct"], dest="direct", action="store_true", default=None,
                        help="serve without a Ziti identity: every destination takes the fallback route (ZEP_DIRECT)")
    parser.add_argument(flag["allow_remote"], dest="allow_remote", action="store_true", default=None,
                        help="allow a non-loopback listen address with default or no credentials (ZEP_ALLOW_REMOTE)")
    for name in ("handshake_timeout", "connect_timeout", "idle_timeout", "ziti_load_timeout"):
        parser.add_argument(flag[name], dest=name, type=float, metavar="SECONDS", help=f"({ENVIRONMENT[name]})")
    parser.add_argument(flag["max_connections"], dest="max_connections", type=int, metavar="N",
                        help="most concurrent client connections (ZEP_MAXCONN)")
    parser.add_argument(flag["max_head_bytes"], dest="max_head_bytes", type=int, metavar="BYTES",
                        help="largest HTTP request head (ZEP_MAX_HEAD_BYTES)")
    parser.add_argument(flag["ziti_service_suffix"], dest="ziti_service_suffix", metavar="SUFFIX",
                        help="host suffix that names a Ziti service directly (ZEP_ZITI_SERVICE_SUFFIX)")
    parser.add_argument(flag["log_level"], dest="log_level", choices=LOG_LEVELS, help="(ZEP_LOG_LEVEL)")
    parser.add_argument(flag["ready_file"], dest="ready_file", metavar="PATH",
                        help="write the listening addresses here as JSON once ready (ZEP_READY_FILE)")
    parser.add_argument(flag["enroll_token_file"], dest="enroll_token_file", metavar="FILE",
                        help="enroll with the one-time token in FILE ('-': stdin), then load the new identity "
                             "(ZEP_ENROLL_TOKEN_FILE; or the token itself in ZITI_ENROLL_TOKEN)")
    parser.add_argument(flag["enroll_identity_out"], dest="enroll_identity_out", metavar="PATH",
                        help="keep the enrolled identity here (mode 0600; loaded instead of enrolling when it "
                             "exists); default: a private file removed at exit (ZEP_ENROLL_IDENTITY_OUT)")
    parser.add_argument("--enroll-token", nargs="?", action=RefuseSecretFlag, help=argparse.SUPPRESS)


class RefuseSecretFlag(argparse.Action):
    """A flag that would put a secret on the command line (which every user can read in
    /proc/PID/cmdline): refused without repeating its value; also stops `--enroll-token` from
    being taken as an abbreviation of `--enroll-token-file`."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.error(f"{self.option_strings[0]} is not a flag: a token on the command line is readable by every "
                     "user; put it in ZITI_ENROLL_TOKEN or in a file for --enroll-token-file")


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
    args = build_parser().parse_args(argv)
    if args.command == "version":
        return print_version()
    if args.command == "enroll":
        return enroll_command(args)
    flags = {key: value for key, value in vars(args).items() if key != "command"}
    try:
        settings = load_settings(os.environ, flags)
    except ConfigError as exc:
        print(f"zep: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    return serve(settings)


def print_version() -> int:
    from zep import relay

    print(f"zep {zep.__version__} (ziti-edge-proxy)")
    print(f"relay: {relay.IMPLEMENTATION} ({relay.WHY})")
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(settings: Settings) -> int:
    import uvloop

    listening = [(settings.socks_enabled, settings.socks_port), (settings.http_enabled, settings.http_port)]
    remove_self_proxies(os.environ, settings.proxy_host, [port for enabled, port in listening if enabled])
    dialers: list[Dialer] = []
    ziti_runtime = None
    if settings.ziti_configured:
        from zep import ziti

        try:
            ziti_runtime = ziti.start(settings)
        except ziti.ZitiSetupError as exc:
            print(f"zep: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        dialers.append(ziti_runtime)
    policy, upstream = settings.egress_policy(), settings.upstream()
    if settings.fallback == "deny" and not policy.open:
        log.warning("ZEP_EGRESS / --egress has no effect: with the fallback deny, nothing is dialed outside Ziti")
    if upstream is not None and settings.fallback != "proxy":
        log.warning("the upstream proxy %s is not used: the fallback is %s", upstream.label, settings.fallback)
    fallback = fallback_dialer(settings.fallback, policy, upstream)
    router = Router(dialers, fallback, settings.connect_timeout)
    try:
        return uvloop.run(_serve(settings, router))
    except OSError as exc:
        print(f"zep: error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if ziti_runtime is not None:
            ziti_runtime.close()


async def _serve(settings: Settings, router: Router) -> int:
    from zep import relay
    from zep.http_session import OVERLOADED, serve_http
    from zep.server import Context, ProxyServer, format_address
    from zep.socks_session import serve_socks5

    credentials = Credentials(settings.username, settings.password) if settings.auth_required else None
    server = ProxyServer(Context(settings, router, relay.relay, credentials))
    ready: dict[str, str] = {}
    if settings.socks_enabled:
        ready["socks5"] = format_address(server.listen("socks5", settings.socks_port, serve_socks5).address)
    if settings.http_enabled:
        ready["http"] = format_address(server.listen("http", settings.http_port, serve_http, OVERLOADED).address)

    log.info("zep %s ready: relay=%s, routes: %s, authentication %s", zep.__version__, relay.IMPLEMENTATION,
             _describe_routes(settings, router), "required" if credentials else "off")
    if settings.ready_file:
        _write_ready_file(settings.ready_file, ready)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: no new connections; closing %d open ones", server.open_connections)
    await server.shutdown()
    return 0


def _describe_routes(settings: Settings, router: Router) -> str:
    first = "Ziti services first, anything else" if router.dialers else "every destination (--direct)"
    if settings.fallback == "deny":
        return f"{first}: deny"
    route = settings.fallback
    upstream = settings.upstream()
    if route == "proxy" and upstream is not None:
        route = f"through the upstream proxy {upstream.label}"
        if upstream.no_proxy.entries or upstream.no_proxy.everything:
            route += " (no-proxy exceptions direct)"
    return f"{first}: {route} ({settings.egress_policy().describe()})"


def _write_ready_file(path: str, ready: dict[str, str]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as out:
        json.dump({"pid": os.getpid(), **ready}, out)
    os.replace(temporary, path)
