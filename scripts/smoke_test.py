#!/usr/bin/env python3
"""Smoke-test a running zep from outside: a payload fetched with curl through the SOCKS5 listener,
the HTTP proxy (absolute-form and CONNECT) arrives intact, a wrong password is refused, and the
admin endpoint (when given) answers. Point it at a container or at a local `zep serve --direct`:

    smoke_test.py --socks 127.0.0.1:1080 --http 127.0.0.1:8080 --admin 127.0.0.1:9090 \\
        --username ci --password-file /run/secrets/proxy-password

The payload comes from an HTTP server this script runs on --upstream-host (default 127.0.0.1), so
zep must dial directly (`--direct`) and reach that address. Standard library and curl only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

PAYLOAD_BYTES = 1 << 20
CURL_TIMEOUT = 30  # seconds, for each transfer
ADMIN_TIMEOUT = 5  # seconds, for each admin request


class Failed(Exception):
    """A check failed; the message says which and what was seen."""


@contextmanager
def payload_server(host: str, payload: bytes) -> Iterator[int]:
    """Serve `payload` at /payload on host:<free port> until the block ends; yields the port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path != "/payload":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def curl(*args: str) -> subprocess.CompletedProcess:
    """curl that takes no proxy from the environment; the body goes to stdout."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["curl", "--silent", "--show-error", "--noproxy", "", "--max-time", str(CURL_TIMEOUT), *args],
                          capture_output=True, env=env, timeout=CURL_TIMEOUT + 5)


def check_transfer(name: str, expected: str, *args: str) -> None:
    result = curl("--fail", *args)
    if result.returncode != 0:
        raise Failed(f"{name}: curl exited {result.returncode}: {result.stderr.decode(errors='replace').strip()}")
    digest = hashlib.sha256(result.stdout).hexdigest()
    if digest != expected:
        raise Failed(f"{name}: {len(result.stdout)} bytes with sha256 {digest}, expected {PAYLOAD_BYTES} bytes")
    print(f"ok: {name}")


def check_refused(http_proxy: str, user: str, url: str) -> None:
    result = curl("--output", "/dev/null", "--write-out", "%{http_code}", "--proxy", http_proxy,
                  "--proxy-user", f"{user}:not-the-password", url)
    if result.stdout != b"407":
        raise Failed(f"a wrong password: expected 407 from the HTTP proxy, got {result.stdout.decode() or result.stderr!r}")
    print("ok: a wrong password is refused (407)")


def check_admin(address: str) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    for path, needle in (("/healthz", None), ("/readyz", None), ("/metrics", "zep_build_info")):
        try:
            with opener.open(f"http://{address}{path}", timeout=ADMIN_TIMEOUT) as response:
                status, body = response.status, response.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            raise Failed(f"admin {path}: {exc}") from None
        if status != 200 or (needle and needle not in body):
            raise Failed(f"admin {path}: status {status}, {'no ' + needle if needle else ''} in {body[:200]!r}")
        print(f"ok: admin {path}")


def run(args: argparse.Namespace) -> None:
    password = ""
    if args.password_file:
        with open(args.password_file) as secret:
            password = secret.read().rstrip("\r\n")
    credentials = f"{args.username}:{password}@" if args.username else ""
    payload = os.urandom(PAYLOAD_BYTES)
    expected = hashlib.sha256(payload).hexdigest()
    with payload_server(args.upstream_host, payload) as port:
        url = f"http://{args.upstream_host}:{port}/payload"
        http_proxy = f"http://{args.http}"
        check_transfer("SOCKS5", expected, "--proxy", f"socks5h://{credentials}{args.socks}", url)
        auth = ["--proxy-user", f"{args.username}:{password}"] if args.username else []
        check_transfer("HTTP proxy, absolute-form", expected, "--proxy", http_proxy, *auth, url)
        check_transfer("HTTP proxy, CONNECT", expected, "--proxytunnel", "--proxy", http_proxy, *auth, url)
        if args.username:
            check_refused(http_proxy, args.username, url)
    if args.admin:
        check_admin(args.admin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socks", required=True, metavar="HOST:PORT", help="zep's SOCKS5 listener")
    parser.add_argument("--http", required=True, metavar="HOST:PORT", help="zep's HTTP proxy listener")
    parser.add_argument("--admin", metavar="HOST:PORT", help="zep's admin listener (/healthz, /readyz, /metrics)")
    parser.add_argument("--username", default="", help="proxy user name (none: no authentication)")
    parser.add_argument("--password-file", metavar="PATH", help="file holding the proxy password")
    parser.add_argument("--upstream-host", default="127.0.0.1", help="where the payload server listens")
    args = parser.parse_args(argv)
    try:
        run(args)
    except Failed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
