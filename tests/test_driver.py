"""The drivers in process: real sockets (a socketpair for the client, loopback upstreams), the real
exchanges, short named timeouts; what the client sees and the access entries that come out.

Every test runs against both drivers, the coroutine `Driver` and the fast path (`FastConnection`,
which hands HTTP forwarding over to a `Driver` midway): the same bytes and the same entries."""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import uvloop

from zep import accesslog
from zep.accesslog import AccessEntry, AccessRecord
from zep.config import Settings
from zep.dial import DirectDialer
from zep.driver import Driver
from zep.http_exchange import HttpExchange
from zep.outcome import Outcome
from zep import relay
from zep.routing import Router
from zep.server import Context, ProxyServer
from zep.socks_exchange import Socks5Exchange
from tests.support.drivers import LOOP_DRIVERS, read_until_closed, start

SHORT = 0.3


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 20))


@pytest.fixture
def entries() -> Iterator[list[AccessEntry]]:
    seen: list[AccessEntry] = []
    accesslog.subscribe(seen.append)
    yield seen
    accesslog.unsubscribe(seen.append)


def context(**timeouts: float) -> Context:
    values = dict(http_request_timeout=SHORT, http_keep_alive_timeout=SHORT, client_timeout=SHORT,
                  server_timeout=SHORT, connect_timeout=SHORT, tunnel_timeout=SHORT)
    values.update(timeouts)
    settings = Settings(direct=True, **values)
    relay.start()  # once per process, as the server does before it listens
    return Context(settings, Router([], DirectDialer(), settings.connect_timeout), relay.relay, None, relay.ready, start_pair=relay.start_pair)


@pytest.fixture(params=LOOP_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


@contextlib.asynccontextmanager
async def connection(driver: str, kind: str = "http", **timeouts: float) -> AsyncIterator[tuple[socket.socket, asyncio.Task]]:
    """A driver on one end of a socketpair; yields the client's end (non-blocking) and its task."""
    ctx = context(**timeouts)
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setblocking(False)
    exchange = HttpExchange(None, 65536) if kind == "http" else Socks5Exchange(None)
    task = start(driver, ctx, theirs, kind, exchange).task
    try:
        yield ours, task
    finally:
        ours.close()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the driver outlived its timeouts"
        if not task.cancelled():
            task.result()


def listener() -> tuple[socket.socket, int]:
    """A loopback upstream to dial: the listening socket (non-blocking) and its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    return server, server.getsockname()[1]


def test_socks5_tunnel_and_its_entry(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver, "socks5") as (client, task):
            await loop.sock_sendall(client, b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big") + b"hi")
            upstream, _ = await loop.sock_accept(server)
            assert await loop.sock_recv(upstream, 2) == b"hi"
            assert (await loop.sock_recv(client, 12))[:4] == b"\x05\x00\x05\x00"
            await loop.sock_sendall(upstream, b"yo")
            assert await loop.sock_recv(client, 2) == b"yo"
            upstream.close()
            client.shutdown(socket.SHUT_WR)
            assert await read_until_closed(client) == b""
        server.close()

    run(main())
    (entry,) = entries
    assert (entry.proto, entry.outcome, entry.up, entry.down) == ("socks5", Outcome.OK, 2, 2)


def test_silent_client_gets_the_http_request_timeout(driver, entries):
    async def main():
        async with connection(driver, "socks5") as (client, task):
            await asyncio.get_running_loop().sock_sendall(client, b"\x05")
            assert await read_until_closed(client) == b""
        async with connection(driver, "http") as (client, task):
            await asyncio.get_running_loop().sock_sendall(client, b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")
            assert (await read_until_closed(client)).startswith(b"HTTP/1.1 408 ")

    run(main())
    assert [e.outcome for e in entries] == [Outcome.REQUEST_TIMEOUT, Outcome.REQUEST_TIMEOUT]


def test_client_stopping_mid_body_gets_the_client_timeout(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver) as (client, task):
            await loop.sock_sendall(client, f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n"
                                            "Content-Length: 100\r\n\r\n0123456789".encode())
            upstream, _ = await loop.sock_accept(server)
            assert (await read_until_closed(client)).startswith(b"HTTP/1.1 408 ")
            assert (await read_until_closed(upstream)).endswith(b"0123456789")  # and the upstream was let go
            upstream.close()
        server.close()

    run(main())
    (entry,) = entries
    assert (entry.outcome, entry.status, entry.method) == (Outcome.CLIENT_TIMEOUT, 408, "POST")


def test_upstream_not_reading_the_body_is_the_server_timeout_and_the_client_is_not_read_meanwhile(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver) as (client, task):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            head = f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n"
            await loop.sock_sendall(client, head.encode())
            upstream, _ = await loop.sock_accept(server)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sent = 0

            async def send_body() -> None:  # a client that sends as fast as zep lets it
                nonlocal sent
                block = b"x" * 65536
                with contextlib.suppress(OSError):
                    while True:
                        await loop.sock_sendall(client, block)
                        sent += len(block)

            sender = loop.create_task(send_body())
            answer = await read_until_closed(client)
            sender.cancel()
            assert answer.startswith(b"HTTP/1.1 504 "), answer[:100]
            assert sent < 20_000_000  # zep read only what the upstream took
            upstream.close()
        server.close()

    run(main())
    (entry,) = entries
    assert (entry.outcome, entry.status) == (Outcome.SERVER_TIMEOUT, 504)


def test_client_not_reading_the_response_is_the_client_timeout(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver) as (client, task):
            await loop.sock_sendall(client, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            upstream, _ = await loop.sock_accept(server)
            await loop.sock_recv(upstream, 65536)
            upstream.setblocking(True)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
            upstream.settimeout(5)
            with contextlib.suppress(OSError):  # zep stops reading once the client stops: sendall times out
                upstream.sendall(head + b"x" * 100_000_000)
            await asyncio.wait_for(task, 5)
            upstream.close()
        server.close()

    run(main())
    (entry,) = entries
    assert (entry.outcome, entry.status) == (Outcome.CLIENT_TIMEOUT, 200)
    assert entry.down < 30_000_000


def test_silent_upstream_is_the_server_timeout_and_keep_alive_ends_quietly(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver) as (client, task):
            request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode()
            await loop.sock_sendall(client, request)
            upstream, _ = await loop.sock_accept(server)
            await loop.sock_sendall(upstream, b"HTTP/1.1 204 No Content\r\n\r\n")
            assert await loop.sock_recv(client, 100) == b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
            await loop.sock_sendall(client, request)  # the same upstream connection, which stays silent now
            assert (await read_until_closed(client)).startswith(b"HTTP/1.1 504 ")
            upstream.close()
        async with connection(driver) as (client, task):
            await loop.sock_sendall(client, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            upstream, _ = await loop.sock_accept(server)
            await loop.sock_sendall(upstream, b"HTTP/1.1 204 No Content\r\n\r\n")
            assert await read_until_closed(client) == b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
            upstream.close()
        server.close()

    run(main())
    assert [(e.outcome, e.status) for e in entries] == [(Outcome.OK, 204), (Outcome.RESPONSE_TIMEOUT, 504),
                                                        (Outcome.OK, 204)]


def test_early_response_while_the_client_is_still_sending(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver, client_timeout=5) as (client, task):
            await loop.sock_sendall(client, f"PUT http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n"
                                            "Content-Length: 10000000\r\n\r\n".encode() + b"x" * 1000)
            upstream, _ = await loop.sock_accept(server)
            await loop.sock_recv(upstream, 65536)
            await loop.sock_sendall(upstream, b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
            upstream.close()
            answer = b""
            while not answer.endswith(b"\r\n\r\n"):
                answer += await loop.sock_recv(client, 65536)
            assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
            client.shutdown(socket.SHUT_WR)  # zep lingers until the client is done
            await read_until_closed(client)
        server.close()

    run(main())
    (entry,) = entries
    assert (entry.outcome, entry.status) == (Outcome.OK, 413)


def test_drain_closes_a_kept_alive_connection_between_requests(entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        ctx = context(http_keep_alive_timeout=30)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        driver = Driver(ctx, theirs, AccessRecord("test", "http"), HttpExchange(None, 65536))
        task = loop.create_task(driver.run())
        await loop.sock_sendall(ours, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        upstream, _ = await loop.sock_accept(server)
        await loop.sock_sendall(upstream, b"HTTP/1.1 204 No Content\r\n\r\n")
        assert (await loop.sock_recv(ours, 100)).startswith(b"HTTP/1.1 204")
        driver.drain()
        assert await read_until_closed(ours, limit=1) == b""
        await task
        ours.close()
        upstream.close()
        server.close()

    run(main())
    assert [e.outcome for e in entries] == [Outcome.OK]


def test_cancel_logs_with_the_counts(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver, "socks5", tunnel_timeout=30) as (client, task):
            await loop.sock_sendall(client, b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
            upstream, _ = await loop.sock_accept(server)
            await loop.sock_recv(client, 12)
            await loop.sock_sendall(client, b"abc")
            assert await loop.sock_recv(upstream, 3) == b"abc"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            upstream.close()
        server.close()

    run(main())
    (entry,) = entries
    assert (entry.outcome, entry.up) == (Outcome.CANCELLED, 3)


def test_a_kept_alive_requests_duration_starts_with_its_first_byte(driver, entries):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        async with connection(driver, http_keep_alive_timeout=30) as (client, task):
            request = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode()
            await loop.sock_sendall(client, request)
            upstream, _ = await loop.sock_accept(server)
            await loop.sock_sendall(upstream, b"HTTP/1.1 204 No Content\r\n\r\n")
            await loop.sock_recv(client, 100)
            await asyncio.sleep(1.0)  # idle between the requests: not part of the second one
            await loop.sock_sendall(client, request)
            assert await loop.sock_recv(upstream, 65536)  # the same upstream connection carries it
            await loop.sock_sendall(upstream, b"HTTP/1.1 204 No Content\r\n\r\n")
            await loop.sock_recv(client, 100)
            upstream.close()
        server.close()

    run(main())
    assert [e.status for e in entries] == [204, 204]
    assert entries[1].seconds < 1.0


@pytest.mark.parametrize("kind, request_bytes, refusal", [
    ("socks5", b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01", b"\x05\x00\x05\x01"),  # general failure
    ("http", b"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 503 "),
])
def test_a_relay_that_cannot_take_a_pair_is_never_announced_to_the_client(entries, kind, request_bytes, refusal):
    async def main():
        server, port = listener()
        loop = asyncio.get_running_loop()
        ctx = dataclasses.replace(context(), relay_ready=lambda: False)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        exchange = HttpExchange(None, 65536) if kind == "http" else Socks5Exchange(None)
        task = loop.create_task(Driver(ctx, theirs, AccessRecord("test", kind), exchange).run())
        data = request_bytes.replace(b"{port}", str(port).encode())
        await loop.sock_sendall(ours, data + (port.to_bytes(2, "big") if kind == "socks5" else b""))
        answer = await read_until_closed(ours)
        await task
        ours.close()
        server.close()
        return answer

    assert run(main()).startswith(refusal)  # never SOCKS5 0x00 or HTTP 200
    (entry,) = entries
    assert entry.outcome is Outcome.INTERNAL_ERROR


def test_drain_stops_accepting_at_once_and_cancels_what_outlives_it(entries):
    async def main():
        server = ProxyServer(context())
        port = server.listen("socks5", 0, lambda ctx: Socks5Exchange(None)).address[1]
        loop = asyncio.get_running_loop()
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        await loop.sock_sendall(client, b"\x05")  # a handshake in progress when the drain starts
        while not server.open_connections:
            await asyncio.sleep(0.01)  # the accept runs on this loop
        assert not server.draining
        await server.drain(0.1)
        assert server.draining and not server.open_connections
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port))
        client.close()

    run(main())
    (entry,) = entries
    assert entry.outcome is Outcome.CANCELLED
