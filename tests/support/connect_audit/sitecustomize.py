"""Put on a zep subprocess's PYTHONPATH with ZEP_TEST_CONNECT_LOG set: every outgoing connect
is appended to that file (`connect HOST PORT`), and connects that would leave loopback are
refused with EACCES before any packet is sent, so tests can let zep try such an address safely."""

import errno
import ipaddress
import os
import sys

_LOG = os.environ.get("ZEP_TEST_CONNECT_LOG")


def _audit(event: str, args: tuple) -> None:
    if event != "socket.connect" or not isinstance(args[1], tuple):
        return
    host, port = args[1][0], args[1][1]
    with open(_LOG, "a") as log:
        log.write(f"connect {host} {port}\n")
    try:
        loopback = ipaddress.ip_address(str(host).partition("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise PermissionError(errno.EACCES, f"test sandbox: no connects beyond loopback ({host})")


if _LOG:
    sys.addaudithook(_audit)
