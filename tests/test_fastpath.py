"""The fast path and the relay engine's SOCKS5 handshake against the coroutine driver, in process:
each scenario runs once on each driver (the engine's for SOCKS5 with the compiled relay) over real
sockets (a socketpair for the client, loopback upstreams), and the client must see the same bytes
and the access log the same entries. Then what only the fast path has to get right: no task on
the common path, and every timer handle cancelled on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import uvloop

from zep import accesslog
from zep.accesslog import AccessEntry, AccessRecord
from zep.auth import Credentials
from zep.config import Settings
from zep.dial import DirectDialer
from zep.egress import EgressPolicy
from zep.exchange import Exchange
from zep.http_exchange import HttpExchange
from zep import relay
from zep.routing import Router
from zep.server import Context
from zep.socks_exchange import Socks5Exchange
from tests.support.clients import blackhole_port
from tests.support.drivers import DRIVERS, Running, read_until_closed, start
from tests.support.upstreams import closed_port

SHORT = 0.3
HELLO = b"\x05\x01\x00"
CREDENTIALS = Credentials("alice", "s3cret")


def socks_connect(host: str, port: int) -> bytes:
    if host.count(".") == 3 and host.replace(".", "").isdigit():
        address = b"\x01" + socket.inet_aton(host)
    else:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    return b"\x05\x01\x00" + address + port.to_bytes(2, "big")


def context(policy: EgressPolicy | None = None, credentials: Credentials | None = None) -> Context:
    settings = Settings(direct=True, http_request_timeout=SHORT, http_keep_alive_timeout=SHORT, client_timeout=SHORT,
                        server_timeout=SHORT, connect_timeout=SHORT, tunnel_timeout=SHORT)
    relay.start()  # once per process, as the server does before it listens
    return Context(settings, Router([], DirectDialer(policy), settings.connect_timeout), relay.relay, credentials,
                   relay.ready, start_pair=relay.start_pair, start_socks=relay.start_socks)


@dataclass
class Seen:
    received: bytes
    entries: list[tuple]


def comparable(entry: AccessEntry) -> tuple:
    return (entry.proto, entry.target, entry.route, entry.user, entry.up, entry.down, entry.outcome, entry.detail,
            entry.method, entry.path, entry.status)


Client = Callable[[socket.socket, Running], Awaitable[bytes]]


def sends(data: bytes, *, shut: bool = False) -> Client:
    """A client that sends `data` (then, with `shut`, its FIN) and reads until zep closes."""
    async def client(sock: socket.socket, running: Running) -> bytes:
        await asyncio.get_running_loop().sock_sendall(sock, data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        return await read_until_closed(sock)
    return client


def run_each(client: Client, kind: str, exchange: Callable[[], Exchange], ctx: Callable[[], Context] = context,
             ) -> dict[str, Seen]:
    seen: dict[str, Seen] = {}
    for driver in drivers_for(kind):
        entries: list[AccessEntry] = []
        accesslog.subscribe(entries.append)
        try:
            received = uvloop.run(asyncio.wait_for(_one(driver, client, kind, exchange(), ctx()), 20))
        finally:
            accesslog.unsubscribe(entries.append)
        seen[driver] = Seen(received, [comparable(e) for e in entries])
    return seen


async def _one(driver: str, client: Client, kind: str, exchange: Exchange, ctx: Context) -> bytes:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setblocking(False)
    running = start(driver, ctx, theirs, kind, exchange)
    try:
        received = await client(ours, running)
    finally:
        ours.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(running.task, 5)
    return received


def drivers_for(kind: str) -> list[str]:
    """The engine takes SOCKS5 handshakes only, and only where the relay is compiled."""
    native = kind == "socks5" and relay.start_socks is not None
    return [d for d in DRIVERS if d != "native" or native]


def assert_same(seen: dict[str, Seen]) -> Seen:
    coroutine = seen["coroutine"]
    for driver, this in seen.items():
        assert (driver, this.received) == (driver, coroutine.received)
        assert (driver, this.entries) == (driver, coroutine.entries)
    assert len(coroutine.entries) == 1
    return coroutine


def socks() -> Socks5Exchange:
    return Socks5Exchange(None)


def http() -> HttpExchange:
    return HttpExchange(None, 65536)


# ----------------------------------------------------------------------------- refusals and failures

def test_socks5_refused_literal():
    port = closed_port()
    seen = assert_same(run_each(sends(HELLO + socks_connect("127.0.0.1", port)), "socks5", socks))
    assert seen.received[:4] == b"\x05\x00\x05\x05"
    assert seen.entries[0][6].label == "dial-failed"


def test_socks5_refused_name_goes_through_the_router():
    port = closed_port()
    seen = assert_same(run_each(sends(HELLO + socks_connect("localhost", port)), "socks5", socks))
    assert seen.received[:3] == b"\x05\x00\x05" and seen.received[3] in (0x04, 0x05)


def test_socks5_literal_denied_by_the_egress_policy():
    ctx = lambda: context(EgressPolicy.parse(["deny 127.0.0.0/8"]))  # noqa: E731
    seen = assert_same(run_each(sends(HELLO + socks_connect("127.0.0.1", 80)), "socks5", socks, ctx))
    assert seen.received[:4] == b"\x05\x00\x05\x02"
    assert seen.entries[0][2] == "deny"


@pytest.mark.parametrize("data, shut", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),  # not SOCKS5
    (b"\x05\x01\x00\x05\x02\x00\x01", False),  # BIND
    (b"\x05\x01", True),  # the client leaves mid-greeting
    (b"\x05", False),  # a silent client: the http-request timeout
    (HELLO + b"\x05\x01\x00\x09", False),  # an unknown address type
])
def test_socks5_handshakes_that_end_early(data, shut):
    assert_same(run_each(sends(data, shut=shut), "socks5", socks))


@pytest.mark.parametrize("greeting", [b"\x05\x01\x00", b"\x05\x01\x02\x01\x05alice\x05wrong", b"\x05\x01\x02\x01\x03bob\x01x"])
def test_socks5_authentication_failures(greeting):
    seen = assert_same(run_each(sends(greeting), "socks5", lambda: Socks5Exchange(CREDENTIALS),
                                lambda: context(credentials=CREDENTIALS)))
    assert seen.entries[0][6].label == "auth-failed"


def test_socks5_connect_timeout():
    with blackhole_port() as port:
        seen = assert_same(run_each(sends(HELLO + socks_connect("127.0.0.1", port)), "socks5", socks))
    assert seen.received[:4] == b"\x05\x00\x05\x06"
    assert seen.entries[0][6].label == "dial-timeout"


@pytest.mark.parametrize("request_head", [
    b"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: x\r\n\r\n",  # refused: 502, and zep lingers
    b"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n",  # an incomplete head: 408
    b"BREW /pot HTTP/1.1\r\n\r\n",  # nonsense: 400
    b"",  # no request at all
])
def test_http_connect_refusals(request_head):
    data = request_head.replace(b"{closed}", str(closed_port()).encode())
    assert_same(run_each(sends(data, shut=bool(data)), "http", http))


def test_http_connect_without_credentials_gets_407():
    head = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n"
    seen = assert_same(run_each(sends(head, shut=True), "http", lambda: HttpExchange(CREDENTIALS, 65536)))
    assert seen.received.startswith(b"HTTP/1.1 407 ")


# ----------------------------------------------------------------------------- tunnels

@contextlib.contextmanager
def echo_upstream():
    """A loopback upstream that echoes what it reads, one connection at a time, in a thread."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # a tunnel zep resets ends with a reset here too
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(5)


def tunnel_client(request: bytes, reply_size: int, payload: bytes) -> Client:
    """Sends the request with `payload` right behind it (early data), reads the reply, then the echo."""
    async def client(sock: socket.socket, running: Running) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, request + payload)
        reply = b""
        while len(reply) < reply_size:
            reply += await loop.sock_recv(sock, reply_size - len(reply))
        echoed = b""
        while len(echoed) < len(payload):
            echoed += await loop.sock_recv(sock, 65536)
        sock.shutdown(socket.SHUT_WR)
        rest = await read_until_closed(sock)
        return reply[:2] + echoed + rest  # the SOCKS5 reply's bound port differs between runs
    return client


def test_socks5_tunnel_with_early_data():
    with echo_upstream() as port:
        seen = assert_same(run_each(tunnel_client(HELLO + socks_connect("127.0.0.1", port), 12, b"early" * 100),
                                    "socks5", socks))
    assert seen.received == b"\x05\x00" + b"early" * 100
    assert seen.entries[0][4:7] == (500, 500, seen.entries[0][6]) and seen.entries[0][6].label == "ok"


def test_http_connect_tunnel_with_early_data():
    with echo_upstream() as port:
        head = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        seen = assert_same(run_each(tunnel_client(head, 39, b"hello"), "http", http))
    assert seen.entries[0][4:6] == (5, 5) and seen.entries[0][8] == "CONNECT"


def test_tunnel_idle_timeout():
    async def client(sock: socket.socket, running: Running) -> bytes:
        await asyncio.get_running_loop().sock_sendall(sock, HELLO + socks_connect("127.0.0.1", port))
        return (await read_until_closed(sock))[:2]

    with echo_upstream() as port:
        seen = assert_same(run_each(client, "socks5", socks))
    assert seen.entries[0][6].label == "tunnel-timeout"


# ----------------------------------------------------------------------------- zep stopping

def cancelled_after(data: bytes, *, wait_for: int = 0) -> Client:
    """Sends `data`, reads `wait_for` bytes, then zep stops (the connection's task is cancelled)."""
    async def client(sock: socket.socket, running: Running) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, data)
        received = b""
        while len(received) < wait_for:
            received += await loop.sock_recv(sock, wait_for - len(received))
        await asyncio.sleep(0)  # let zep take in what was sent
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.task
        return received[:2] + await read_until_closed(sock)
    return client


def test_cancelled_mid_handshake():
    seen = assert_same(run_each(cancelled_after(HELLO, wait_for=2), "socks5", socks))
    assert seen.entries[0][6].label == "cancelled"


def test_cancelled_while_dialing():
    with blackhole_port() as port:
        seen = assert_same(run_each(cancelled_after(HELLO + socks_connect("127.0.0.1", port), wait_for=2),
                                    "socks5", socks))
    assert seen.entries[0][6].label == "cancelled" and seen.entries[0][1] == f"127.0.0.1:{port}"


def test_cancelled_in_a_tunnel():
    with echo_upstream() as port:
        seen = assert_same(run_each(cancelled_after(HELLO + socks_connect("127.0.0.1", port), wait_for=12),
                                    "socks5", socks))
    assert seen.entries[0][6].label == "cancelled"


def test_drain_before_the_first_request():
    async def client(sock: socket.socket, running: Running) -> bytes:
        await asyncio.sleep(0)
        running.drain()
        return await read_until_closed(sock)

    seen = assert_same(run_each(client, "http", http))
    assert seen.entries[0][6].label == "cancelled" and seen.entries[0][7] == "zep is draining"


# ----------------------------------------------------------------------------- the fast path's own promises

def test_the_common_path_runs_no_task_and_leaves_no_timer():
    """A SOCKS5 handshake, an IP-literal dial and the hand-off: no task besides the test's own,
    and after the tunnel no timer handle is left on the loop."""
    def timers(loop: asyncio.AbstractEventLoop) -> set | None:
        scheduled = getattr(loop, "_scheduled", None)  # asyncio's own loop lists its timers; uvloop does not
        return None if scheduled is None else {handle for handle in scheduled if not handle.cancelled()}

    async def main(port: int) -> tuple[set, set | None]:
        loop = asyncio.get_running_loop()
        before, timers_before = asyncio.all_tasks(), timers(loop)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        running = start("fast", context(), theirs, "socks5", socks())
        await loop.sock_sendall(ours, HELLO + socks_connect("127.0.0.1", port))
        reply = b""
        while len(reply) < 12:
            reply += await loop.sock_recv(ours, 12 - len(reply))
        others = asyncio.all_tasks() - before - {running.task}
        ours.shutdown(socket.SHUT_WR)
        await read_until_closed(ours)
        await running.task
        ours.close()
        left = timers(loop)
        return others, None if left is None else left - timers_before

    with echo_upstream() as port:
        others, _ = uvloop.run(asyncio.wait_for(main(port), 20))
        assert others == set()
        _, left = asyncio.run(asyncio.wait_for(main(port), 20))
    assert left == set()


# ----------------------------------------------------------------------------- the engine's handshake

needs_engine = pytest.mark.skipif(relay.start_socks is None, reason="the compiled relay is not in use")


def dripping(data: bytes, then: Client) -> Client:
    """Sends `data` a byte at a time, each after the last has been taken in, then runs `then`."""
    async def client(sock: socket.socket, running: Running) -> bytes:
        for i in range(len(data)):
            await asyncio.get_running_loop().sock_sendall(sock, data[i:i + 1])
            await asyncio.sleep(0.002)
        return await then(sock, running)
    return client


def engine_counts() -> tuple[int, int, int]:
    stats = relay.stats()
    return stats["socks_native"], stats["socks_relayed"], stats["socks_given_back"]


def native_only(client: Client, exchange: Callable[[], Exchange] = socks, ctx: Callable[[], Context] = context,
                ) -> tuple[Seen, tuple[int, int, int]]:
    """One run on the engine's driver: what the client saw, and how the engine's counts moved."""
    entries: list[AccessEntry] = []
    before = engine_counts()
    accesslog.subscribe(entries.append)
    try:
        received = uvloop.run(asyncio.wait_for(_one("native", client, "socks5", exchange(), ctx()), 20))
    finally:
        accesslog.unsubscribe(entries.append)
    after = engine_counts()
    return Seen(received, [comparable(e) for e in entries]), tuple(a - b for a, b in zip(after, before))


@needs_engine
def test_the_engine_keeps_the_common_path_to_itself():
    with echo_upstream() as port:
        seen, (native, relayed, given_back) = native_only(
            tunnel_client(HELLO + socks_connect("127.0.0.1", port), 12, b"ping"))
    assert (native, relayed, given_back) == (1, 1, 0)
    assert seen.received == b"\x05\x00ping" and seen.entries[0][6].label == "ok"


@needs_engine
def test_the_engine_logs_a_login_and_relays():
    login = b"\x05\x01\x02\x01\x05alice\x06s3cret"
    with echo_upstream() as port:
        request = login + socks_connect("127.0.0.1", port)
        for dribble in (False, True):
            client = tunnel_client(request, 14, b"ping")
            seen, counts = native_only(dripping(request, tunnel_client(b"", 14, b"ping")) if dribble else client,
                                       lambda: Socks5Exchange(CREDENTIALS), lambda: context(credentials=CREDENTIALS))
            assert counts == (1, 1, 0), dribble
            assert seen.received == b"\x05\x02ping" and seen.entries[0][3] == "alice"


@needs_engine
def test_a_name_goes_back_to_python_with_the_same_outcome():
    port = closed_port()
    seen, counts = native_only(sends(HELLO + socks_connect("localhost", port)))
    assert counts == (1, 0, 1)
    assert seen.entries[0][6].label == "dial-failed"


@pytest.mark.parametrize("data", [
    HELLO + socks_connect("127.0.0.1", 1),
    b"\x05\x01\x02\x01\x05alice\x05wrong",
    b"\x05\x02\x00\x02",
    HELLO + b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x50",
])
def test_a_handshake_sent_a_byte_at_a_time_ends_the_same_on_every_driver(data):
    ctx = lambda: context(credentials=CREDENTIALS if data[2] == 2 and data[1] == 1 else None)  # noqa: E731
    exchange = lambda: Socks5Exchange(CREDENTIALS if data[2] == 2 and data[1] == 1 else None)  # noqa: E731
    assert_same(run_each(dripping(data, sends(b"")), "socks5", exchange, ctx))


@needs_engine
def test_a_destination_routed_direct_once_is_dialed_again_without_asking():
    """The second connection to a destination routed direct (reachable or not) never reaches
    Python before it ends, and its entry is the same; a refused destination is asked about every
    time."""
    from tests.support.drivers import FastRun
    from zep.nativepath import EngineFront, NativeSocks

    async def one(ctx: Context, front: EngineFront, client: Client) -> Seen:
        entries: list[AccessEntry] = []
        accesslog.subscribe(entries.append)
        try:
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            run = FastRun()
            loop = asyncio.get_running_loop()
            native = NativeSocks(ctx, front, AccessRecord("test", "socks5"), lambda _ctx: socks(), run)
            task = loop.create_task(run.run(native, lambda: native.start(theirs.detach(), loop)))
            received = await client(ours, Running(task, run.drain))
            ours.close()
            await asyncio.wait_for(task, 5)
        finally:
            accesslog.unsubscribe(entries.append)
        return Seen(received, [comparable(e) for e in entries])

    async def main(targets: list[tuple[str, int]]) -> list[tuple[Seen, int]]:
        ctx = context(EgressPolicy.parse(["deny 127.0.0.3/32"]))
        front = EngineFront.of(ctx, relay.Verdicts())
        seen = []
        for host, port in targets:
            before = relay.stats()["socks_remembered"]
            client = (tunnel_client(HELLO + socks_connect(host, port), 12, b"ping") if port == echo
                      else sends(HELLO + socks_connect(host, port)))
            seen.append((await one(ctx, front, client), relay.stats()["socks_remembered"] - before))
        return seen

    closed = closed_port()
    with echo_upstream() as echo:
        runs = uvloop.run(asyncio.wait_for(main([("127.0.0.1", echo)] * 2 + [("127.0.0.1", closed)] * 2
                                                + [("127.0.0.3", 80)] * 2), 30))
    assert [remembered for _seen, remembered in runs] == [0, 1, 0, 1, 0, 0]
    (ok, ok_again), (failed, failed_again), (denied, denied_again) = [
        (runs[i][0], runs[i + 1][0]) for i in (0, 2, 4)]
    assert ok == ok_again and ok.entries[0][1:3] == (f"127.0.0.1:{echo}", "direct") and ok.entries[0][6].label == "ok"
    assert failed == failed_again and failed.entries[0][6].label == "dial-failed"
    assert denied == denied_again and denied.entries[0][6].label == "denied"
