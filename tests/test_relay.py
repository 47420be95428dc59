"""The relay contract, run against both implementations, each through both of its interfaces:
`relay()` (a coroutine) and `start_pair()` (a callback, for the fast path).

Every test drives real sockets (loopback TCP or socketpairs). The ends the
relay does not own ("the client app" and "the upstream server") are driven
from the same event loop with the loop's sock_* helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import uvloop

from zep.relay_result import RelayCancelled, RelayEnd, RelayResult, RelayUnavailable

MiB = 1024 * 1024
STATE_TIMEOUT = 10.0  # seconds a socket may take to reach the state a test waits for
FULL_AFTER = 0.5  # seconds a sender stays unwritable before the pipeline counts as full


# -- implementations -----------------------------------------------------------


def load(name: str):
    """The relay module for an implementation name. The compiled engine must be
    present unless ZEP_NO_EXTENSIONS says it is deliberately not built: a
    missing build fails, it is not skipped."""
    if name == "python":
        import zep._relay_py as mod

        mod.start()  # a no-op, there by contract
        return mod
    if os.environ.get("ZEP_NO_EXTENSIONS"):
        pytest.skip("ZEP_NO_EXTENSIONS is set: the compiled relay is not expected")
    if not sys.platform.startswith("linux"):
        pytest.skip("the compiled relay is Linux only")
    try:
        import zep._relay as mod
    except ImportError as exc:
        pytest.fail(f"compiled relay not importable (build it, or set ZEP_NO_EXTENSIONS): {exc}")
    mod.start()
    return mod


class CallbackRelay:
    """A relay module seen through start_pair(): relay() awaits the pair's done callback, so that
    every test of the contract holds for the fast path's interface too."""

    def __init__(self, module) -> None:
        self.module = module

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    async def relay(self, client, upstream, *, to_upstream=b"", to_client=b"", idle_timeout):
        done = asyncio.get_running_loop().create_future()
        handle = self.module.start_pair(client, upstream, to_upstream=to_upstream, to_client=to_client,
                                        idle_timeout=idle_timeout, done=done.set_result)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            handle.cancel()
            raise RelayCancelled(await done) from None


@pytest.fixture(params=["cython", "python", "cython-callback", "python-callback"])
def impl(request):
    """The relay under test, once per implementation and interface."""
    name, _, interface = request.param.partition("-")
    module = load(name)
    return CallbackRelay(module) if interface else module


@pytest.fixture
def engine():
    """The compiled engine, for tests of its internals (pipes, copy fallback)."""
    return load("cython")


def run(coro):
    """Run a test coroutine on uvloop (what the server uses)."""
    return uvloop.run(asyncio.wait_for(coro, 20))


# -- socket helpers ------------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (non-blocking)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def unix_pair(kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Pair:
    """app <-> [client | relay | upstream] <-> server"""

    def __init__(self, make=tcp_pair):
        self.app, self.client = make()
        self.upstream, self.server = make()

    def close_ends(self):
        for s in (self.app, self.server):
            with contextlib.suppress(OSError):
                s.close()


async def send_all(sock, data: bytes, *, eof: bool = True, chunk: int = 256 * 1024):
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        await loop.sock_sendall(sock, view[i : i + chunk])
    if eof:
        sock.shutdown(socket.SHUT_WR)


async def recv_all(sock) -> tuple[int, str]:
    """Read to EOF; return (length, sha256)."""
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    n = 0
    while True:
        b = await loop.sock_recv(sock, 1 << 20)
        if not b:
            return n, h.hexdigest()
        h.update(b)
        n += len(b)


async def recv_exact(sock, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        b = await loop.sock_recv(sock, n - len(buf))
        if not b:
            break
        buf += b
    return bytes(buf)


async def recv_until_end(sock) -> tuple[bytes, BaseException | None]:
    """Read until EOF or an error; return what came and the error (None on EOF)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while True:
        try:
            b = await loop.sock_recv(sock, 1 << 16)
        except OSError as exc:
            return bytes(buf), exc
        if not b:
            return bytes(buf), None
        buf += b


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reset_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def queued(sock) -> int:
    """Bytes in a socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def unsent(fd: int) -> int:
    """Bytes a TCP socket accepted and its peer has not acknowledged (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]


def polled(sock) -> int:
    """The poll(2) events a socket reports now (without consuming a pending error)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLOUT | select.POLLRDHUP)
    return sum(events for _, events in poller.poll(0))


async def until(condition, what: str, timeout: float = STATE_TIMEOUT):
    """Wait, bounded, until condition() holds (a socket state)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.001)


async def writable(sock, timeout: float) -> bool:
    """Whether `sock` becomes writable within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(sock)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- transfers -----------------------------------------------------------------


def exchange(impl, make, up: bytes, down: bytes) -> RelayResult:
    """Send `up` and `down` through a relayed pair at once, check both arrive intact, return the result."""

    async def main():
        p = Pair(make)
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        res = await asyncio.gather(
            send_all(p.app, up), recv_all(p.server), send_all(p.server, down), recv_all(p.app)
        )
        r = await t
        p.close_ends()
        return r, res

    r, (_, got_up, _, got_down) = run(main())
    assert got_up == (len(up), sha(up))
    assert got_down == (len(down), sha(down))
    return r


@pytest.mark.parametrize("make", [tcp_pair, unix_pair], ids=["tcp", "unix"])
def test_large_transfer_both_ways(impl, make):
    up = os.urandom(MiB) * 64 + os.urandom(12345)  # >= 64 MiB, not chunk-aligned
    down = os.urandom(MiB) * 16 + os.urandom(777)

    r = exchange(impl, make, up, down)
    assert r == RelayResult(len(up), len(down), r.seconds, RelayEnd.DONE, "", download_finished=True)
    assert r.seconds > 0


@pytest.mark.parametrize("size_up,size_down", [(0, 0), (1, 0), (0, 1), (1, 1), (100, 3)])
def test_tiny_transfers(impl, size_up, size_down):
    up, down = os.urandom(size_up), os.urandom(size_down)

    r = exchange(impl, tcp_pair, up, down)
    assert (r.bytes_up, r.bytes_down, r.ended) == (size_up, size_down, RelayEnd.DONE)


def test_default_asyncio_loop(impl):
    """The relay also works on the stock asyncio loop."""
    data = os.urandom(4 * MiB + 1)

    async def main():
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, to_upstream=b"hi", idle_timeout=30))
        res = await asyncio.gather(send_all(p.app, data), recv_all(p.server), send_all(p.server, b""), recv_all(p.app))
        r = await t
        p.close_ends()
        return r, res

    r, res = asyncio.run(main())
    assert res[1] == (len(data) + 2, sha(b"hi" + data))
    assert r.ended is RelayEnd.DONE and r.bytes_up == len(data) + 2


def test_many_concurrent_pairs(impl):
    n = 200

    async def one(i):
        p = Pair(tcp_pair if i % 2 else unix_pair)
        up = os.urandom((i * 7919) % 70000)
        down = os.urandom((i * 104729) % 50000)
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        res = await asyncio.gather(
            send_all(p.app, up), recv_all(p.server), send_all(p.server, down), recv_all(p.app)
        )
        r = await t
        p.close_ends()
        assert res[1] == (len(up), sha(up))
        assert res[3] == (len(down), sha(down))
        assert (r.bytes_up, r.bytes_down, r.ended) == (len(up), len(down), RelayEnd.DONE)

    async def main():
        await asyncio.gather(*(one(i) for i in range(n)))

    run(main())


def test_early_bytes_go_first(impl):
    async def main():
        p = Pair()
        # Both ends have already sent data before the relay starts: the early
        # bytes must still come out first.
        p.app.send(b"from-app")
        p.server.send(b"from-server")
        await until(lambda: queued(p.client) == 8 and queued(p.upstream) == 11, "both sends queued")
        t = asyncio.ensure_future(
            impl.relay(p.client, p.upstream, to_upstream=b"EARLY-UP|", to_client=b"EARLY-DOWN|", idle_timeout=30)
        )
        p.app.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        got_server, got_app = await asyncio.gather(recv_until_end(p.server), recv_until_end(p.app))
        r = await t
        p.close_ends()
        return r, got_server, got_app

    r, got_server, got_app = run(main())
    assert got_server == (b"EARLY-UP|from-app", None)
    assert got_app == (b"EARLY-DOWN|from-server", None)
    assert (r.bytes_up, r.bytes_down, r.ended) == (17, 22, RelayEnd.DONE)


def test_large_early_bytes_with_slow_peer(impl):
    """Early bytes larger than any socket buffer still arrive whole, in order."""
    early = os.urandom(8 * MiB)

    async def main():
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, to_upstream=early, idle_timeout=30))
        # the early bytes are on their way and the server is not reading yet
        await until(lambda: queued(p.server) > 0, "early bytes arriving")
        res = await asyncio.gather(send_all(p.app, b"tail"), recv_all(p.server), send_all(p.server, b""), recv_all(p.app))
        r = await t
        p.close_ends()
        return r, res

    r, res = run(main())
    assert res[1] == (len(early) + 4, sha(early + b"tail"))
    assert r.bytes_up == len(early) + 4 and r.ended is RelayEnd.DONE


# -- half-close ------------------------------------------------------------------


@pytest.mark.parametrize("first", ["app", "server"])
def test_half_close(impl, first):
    """EOF from one end reaches the other as EOF while the reverse direction
    keeps working; the relay ends only when both directions are done."""

    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        closer, other = (p.app, p.server) if first == "app" else (p.server, p.app)
        await loop.sock_sendall(closer, b"request")
        closer.shutdown(socket.SHUT_WR)
        got, err = await recv_until_end(other)  # EOF arrives on the other end
        assert (got, err) == (b"request", None)
        assert not t.done()
        # The reverse direction still flows after the half-close.
        reply = os.urandom(3 * MiB)
        await asyncio.gather(send_all(other, reply), recv_all(closer))
        r = await t
        got_back = None
        p.close_ends()
        return r, reply, got_back

    r, reply, _ = run(main())
    assert r.ended is RelayEnd.DONE
    if first == "app":
        assert (r.bytes_up, r.bytes_down) == (7, len(reply))
    else:
        assert (r.bytes_up, r.bytes_down) == (len(reply), 7)


def test_half_close_reply_content(impl):
    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        await loop.sock_sendall(p.app, b"ping")
        p.app.shutdown(socket.SHUT_WR)
        assert await recv_until_end(p.server) == (b"ping", None)
        await loop.sock_sendall(p.server, b"pong after eof")
        p.server.shutdown(socket.SHUT_WR)
        got = await recv_until_end(p.app)
        r = await t
        p.close_ends()
        return got, r

    got, r = run(main())
    assert got == (b"pong after eof", None)
    assert r.ended is RelayEnd.DONE


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["upstream", "client"])
def test_reset_mid_transfer_is_classified_and_propagated(impl, who):
    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        resetter, victim = (p.server, p.app) if who == "upstream" else (p.app, p.server)
        # Data flowing towards the resetter, which never reads it, and a bit
        # from it; then it resets.
        await loop.sock_sendall(resetter, b"x" * 1000)
        assert await recv_exact(victim, 1000) == b"x" * 1000
        await loop.sock_sendall(victim, b"y" * 5000)
        await until(lambda: queued(resetter) == 5000, "the bytes the resetter will not read")
        reset_close(resetter)
        got, err = await recv_until_end(victim)
        r = await t
        p.close_ends()
        return r, err

    r, err = run(main())
    want = RelayEnd.UPSTREAM_ERROR if who == "upstream" else RelayEnd.CLIENT_ERROR
    assert r.ended is want
    assert r.error in ("ECONNRESET", "EPIPE")
    # The reset reaches the other end as a reset, not as a clean EOF.
    assert isinstance(err, ConnectionResetError), err
    if who == "upstream":
        assert r.bytes_down == 1000
    else:
        assert r.bytes_up == 1000


@pytest.mark.parametrize("download_ends", [True, False], ids=["after-upstream-eof", "mid-download"])
def test_a_client_reset_says_whether_the_download_had_finished(impl, download_ends):
    """npm, apt and others reset a connection once they have read everything: the result says
    whether the upstream's EOF had reached the client by then."""
    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        await loop.sock_sendall(p.server, b"the whole file")
        if download_ends:
            p.server.shutdown(socket.SHUT_WR)
            got, err = await recv_until_end(p.app)
            assert (got, err) == (b"the whole file", None)
        else:
            assert await recv_exact(p.app, 14) == b"the whole file"
        reset_close(p.app)
        r = await t
        p.close_ends()
        return r

    r = run(main())
    assert r.ended is RelayEnd.CLIENT_ERROR
    assert r.download_finished is download_ends


@pytest.mark.parametrize("make", [tcp_pair, unix_pair], ids=["tcp", "unix"])
def test_client_reset_counts_what_the_client_socket_took(impl, make):
    """A download the app stopped reading, then reset: bytes_down is what the client socket
    accepted (in the app's receive queue, or still in the client's send queue over TCP), not
    what the relay had read for it besides."""

    async def main():
        p = Pair(make)
        p.app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        cfd = p.client.fileno()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        block = os.urandom(64 * 1024)
        while True:  # fill the pipeline: the app does not read
            try:
                p.server.send(block)
            except BlockingIOError:
                if not await writable(p.server, FULL_AFTER):
                    break
        took = queued(p.app) + (unsent(cfd) if make is tcp_pair else 0)
        reset_close(p.app)
        r = await t
        p.close_ends()
        return r, took

    r, took = run(main())
    assert r.ended is RelayEnd.CLIENT_ERROR
    assert r.bytes_down == took > 0


def test_upstream_reset_before_any_byte(impl):
    """What the server uses to tell 'upstream refused us' from a real session."""

    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, to_upstream=b"GET / HTTP/1.1\r\n\r\n", idle_timeout=30))
        await loop.sock_sendall(p.app, b"more")
        reset_close(p.server)
        got, err = await recv_until_end(p.app)
        r = await t
        p.close_ends()
        return r, got, err

    r, got, err = run(main())
    assert r.ended is RelayEnd.UPSTREAM_ERROR
    assert r.bytes_down == 0 and got == b""
    assert isinstance(err, ConnectionResetError)


def test_client_reset_before_start(impl):
    async def main():
        p = Pair()
        reset_close(p.app)
        await until(lambda: polled(p.client) & select.POLLERR, "the reset reached the client socket")
        r = await impl.relay(p.client, p.upstream, to_client=b"hello", idle_timeout=30)
        got, err = await recv_until_end(p.server)
        p.close_ends()
        return r, err

    r, err = run(main())
    assert r.ended is RelayEnd.CLIENT_ERROR
    assert isinstance(err, ConnectionResetError)


# -- how the ends see an unfinished pair end -----------------------------------------
# Unless both directions finished, the relay resets both sockets rather than closing them with a
# FIN: a client reading a download to EOF must not take a cut one for complete (nor an upstream a
# cut upload).


@contextlib.asynccontextmanager
async def transferring(impl, direction: str, **relay_args):
    """A pair with a bulk transfer under way, "down" (server -> app) or "up": the receiving end
    has read the first MiB. Yields the pair, the relay task and the receiving end."""
    p = Pair()
    t = asyncio.ensure_future(impl.relay(p.client, p.upstream, **relay_args))
    sender, receiver = (p.server, p.app) if direction == "down" else (p.app, p.server)
    blast = asyncio.ensure_future(send_all(sender, os.urandom(MiB) * 64, eof=False))
    try:
        assert len(await recv_exact(receiver, MiB)) == MiB
        yield p, t, receiver
    finally:
        blast.cancel()
        await asyncio.gather(blast, return_exceptions=True)
        p.close_ends()


@pytest.mark.parametrize("direction", ["down", "up"])
def test_cancel_mid_transfer_resets_the_receiver(impl, direction):
    async def main():
        async with transferring(impl, direction, idle_timeout=None) as (p, t, receiver):
            t.cancel()
            with pytest.raises(RelayCancelled):
                await t
            return await recv_until_end(receiver)

    _, err = run(main())
    assert isinstance(err, ConnectionResetError), err


def test_upstream_reset_mid_download_resets_the_client(impl):
    async def main():
        async with transferring(impl, "down", idle_timeout=None) as (p, t, app):
            reset_close(p.server)
            _, err = await recv_until_end(app)
            return await t, err

    r, err = run(main())
    assert r.ended is RelayEnd.UPSTREAM_ERROR
    assert isinstance(err, ConnectionResetError), err


# -- backpressure ------------------------------------------------------------------


def _absorbed(impl, direction: str) -> int:
    """Push into one end while the far end does not read; return how many bytes
    the pipeline swallowed once it stopped taking more."""

    async def main():
        p = Pair(unix_pair)
        # Small, fixed kernel buffers so what we measure is mostly the relay.
        for s in (p.app, p.client, p.upstream, p.server):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        src, dst = (p.server, p.app) if direction == "down" else (p.app, p.server)
        block = os.urandom(64 * 1024)
        h = hashlib.sha256()
        sent = 0
        while sent <= 256 * MiB:
            try:
                n = src.send(block)
            except BlockingIOError:
                if not await writable(src, FULL_AFTER):
                    break  # the pipeline is full
                continue
            h.update(block[:n])
            sent += n
        stats = impl.stats() if hasattr(impl, "stats") else None
        # Now drain: everything swallowed comes out intact.
        src.shutdown(socket.SHUT_WR)
        dst.shutdown(socket.SHUT_WR)
        got = await recv_all(dst)
        await t
        p.close_ends()
        assert got == (sent, h.hexdigest())
        return sent, stats

    return run(main())


@pytest.mark.parametrize("direction", ["down", "up"])
def test_slow_reader_bounded_memory(impl, direction):
    sent, stats = _absorbed(impl, direction)
    # Kernel socket buffers (4 x 64 KiB, doubled by the kernel) plus what the
    # relay holds for one direction: a few MiB at most, never the stream.
    assert sent < 8 * MiB, sent
    if stats is not None:
        assert 0 < stats["pipe_bytes_max"] <= stats["pipe_size"]


# -- idle timeout ------------------------------------------------------------------


def test_idle_timeout(impl):
    async def main():
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, to_upstream=b"hi", idle_timeout=0.3))
        assert await recv_exact(p.server, 2) == b"hi"
        r = await t
        ends = await asyncio.gather(recv_until_end(p.app), recv_until_end(p.server))
        p.close_ends()
        return r, ends

    r, ((app_got, app_err), (server_got, server_err)) = run(main())
    assert r.ended is RelayEnd.IDLE_TIMEOUT
    assert (r.bytes_up, r.bytes_down) == (2, 0)
    # Both ends see the pair go away, with a reset: it was cut, not finished.
    assert app_got == server_got == b""
    assert isinstance(app_err, ConnectionResetError), app_err
    assert isinstance(server_err, ConnectionResetError), server_err


def test_traffic_keeps_pair_alive(impl):
    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=1.0))
        for i in range(15):  # 1.5 s in total, never 1 s without a byte
            await asyncio.sleep(0.1)
            await loop.sock_sendall(p.app if i % 2 else p.server, b"k")
        assert not t.done()
        p.app.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        r = await t
        p.close_ends()
        return r

    r = run(main())
    assert r.ended is RelayEnd.DONE
    assert r.bytes_up + r.bytes_down == 15


def test_no_idle_timeout(impl):
    async def main():
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=None))
        await asyncio.sleep(0.3)
        assert not t.done()
        p.app.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        r = await t
        p.close_ends()
        return r

    assert run(main()).ended is RelayEnd.DONE


# -- cancellation --------------------------------------------------------------------


def test_cancel_closes_pair_and_reports_counts(impl):
    async def main():
        loop = asyncio.get_running_loop()
        p = Pair()
        client, upstream = p.client, p.upstream
        t = asyncio.ensure_future(impl.relay(client, upstream, to_client=b"ab", idle_timeout=None))
        await loop.sock_sendall(p.app, b"u" * 100)
        assert await recv_exact(p.server, 100) == b"u" * 100
        assert await recv_exact(p.app, 2) == b"ab"
        await loop.sock_sendall(p.server, b"d" * 10)
        assert await recv_exact(p.app, 10) == b"d" * 10
        t.cancel()
        with pytest.raises(RelayCancelled) as info:
            await t
        # Both ends see the pair go away promptly.
        end_app = await recv_until_end(p.app)
        end_srv = await recv_until_end(p.server)
        closed = client.fileno() == -1 and upstream.fileno() == -1
        p.close_ends()
        return info.value, end_app, end_srv, closed

    exc, end_app, end_srv, closed = run(main())
    assert isinstance(exc, asyncio.CancelledError)
    assert exc.result.ended is RelayEnd.CANCELLED
    assert (exc.result.bytes_up, exc.result.bytes_down) == (100, 12)
    assert end_app[0] == b"" and end_srv[0] == b""
    assert closed


def test_cancel_many_with_traffic(impl):
    """Cancel pairs in the middle of bulk transfers: every one ends, fds come back."""

    async def main():
        pairs = [Pair() for _ in range(20)]

        async def guarded(p):
            # The way a caller gets the counts: catch RelayCancelled inside the
            # cancelled coroutine (a Task's stored exception may be replaced).
            try:
                return await impl.relay(p.client, p.upstream, idle_timeout=None)
            except RelayCancelled as exc:
                return exc

        tasks = [asyncio.ensure_future(guarded(p)) for p in pairs]
        blasts = [asyncio.ensure_future(send_all(p.app, os.urandom(MiB) * 16)) for p in pairs]
        for p in pairs:  # something is flowing on each
            await recv_exact(p.server, 1000)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for b in blasts:
            b.cancel()
        await asyncio.gather(*blasts, return_exceptions=True)
        for p in pairs:
            p.close_ends()
        return results

    base = fd_count()
    results = run(main())
    assert all(isinstance(r, RelayCancelled) for r in results), results
    assert all(r.result.bytes_up >= 1000 for r in results)
    assert fd_count() <= base


# -- resources ------------------------------------------------------------------------


def test_fds_back_to_baseline(impl):
    async def warm():
        p = Pair()
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        await asyncio.gather(send_all(p.app, b"w"), send_all(p.server, b"w"), recv_all(p.app), recv_all(p.server))
        await t
        p.close_ends()

    async def many():
        async def one(i):
            p = Pair()
            t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
            data = os.urandom(200_000)
            await asyncio.gather(send_all(p.app, data), send_all(p.server, data), recv_all(p.app), recv_all(p.server))
            await t
            p.close_ends()

        await asyncio.gather(*(one(i) for i in range(100)))

    def held():
        # The engine's pipe pool is its own, not per pair: it may grow with
        # the most pipes ever in use at once.
        pooled = impl.stats()["pipes_pooled"] if hasattr(impl, "stats") else 0
        return fd_count() - 2 * pooled

    run(warm())  # starts the engine (its own fds are not per pair)
    base = held()
    run(many())
    assert held() == base
    if hasattr(impl, "stats"):
        assert impl.stats()["pipes_in_use"] == 0


def test_sockets_closed_exactly_once(impl):
    """The relay closes both fds, and never closes a number again later (which
    would hit whatever reused it)."""

    async def main():
        p = Pair()
        fds = (p.client.fileno(), p.upstream.fileno())
        t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
        await asyncio.gather(send_all(p.app, b"a"), send_all(p.server, b"b"), recv_all(p.app), recv_all(p.server))
        await t
        assert p.client.fileno() == -1 and p.upstream.fileno() == -1
        assert not any(fd_is_open(fd) for fd in fds)
        # Reuse those numbers, then run more pairs to completion: a late second
        # close would close our pipes.
        pipes = [os.pipe() for _ in range(4)]
        for _ in range(5):
            q = Pair()
            t = asyncio.ensure_future(impl.relay(q.client, q.upstream, idle_timeout=30))
            await asyncio.gather(send_all(q.app, b"a"), send_all(q.server, b"b"), recv_all(q.app), recv_all(q.server))
            await t
            q.close_ends()
        alive = all(fd_is_open(fd) for pr in pipes for fd in pr)
        for pr in pipes:
            for fd in pr:
                with contextlib.suppress(OSError):
                    os.close(fd)
        p.close_ends()
        return alive

    assert run(main())


def test_unusable_socket_still_closes_the_other(impl):
    """Ownership holds even when the relay cannot start: the good socket is closed."""

    async def main():
        p = Pair()
        p.upstream.close()  # not a usable socket any more
        with pytest.raises(OSError) as info:
            await impl.relay(p.client, p.upstream, idle_timeout=30)
        got = await asyncio.wait_for(recv_until_end(p.app), 10)
        closed = p.client.fileno() == -1
        p.close_ends()
        return info.value, got, closed

    exc, got, closed = run(main())
    assert exc.errno == errno.EBADF
    assert got[0] == b"" and isinstance(got[1], ConnectionResetError), got
    assert closed


def test_event_loops_in_two_threads(impl):
    """Pairs relayed from two event loops at once, each in its own thread."""

    data = os.urandom(2 * MiB)
    out: dict[int, object] = {}

    async def main(i):
        async def one():
            p = Pair()
            t = asyncio.ensure_future(impl.relay(p.client, p.upstream, idle_timeout=30))
            res = await asyncio.gather(send_all(p.app, data), recv_all(p.server), send_all(p.server, data), recv_all(p.app))
            r = await t
            p.close_ends()
            return res[1], res[3], r.ended

        return await asyncio.gather(*(one() for _ in range(10)))

    def worker(i):
        try:
            out[i] = run(main(i))
        except BaseException as exc:  # reported below
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = (len(data), sha(data))
    for i in range(2):
        assert not isinstance(out[i], BaseException), out[i]
        assert all(r == (want, want, RelayEnd.DONE) for r in out[i])


def test_pairs_finishing_at_once_on_two_loops(impl):
    """Pairs that finish as soon as they start (both ends already shut), from two event loops in
    two threads while a third holds the GIL: a completion may be drained by the other loop
    before relay() has gone on, and must still reach its own caller (or that caller waits for
    ever). A loop that makes no progress for STALL seconds has lost a completion; a loop that is
    merely slow (a loaded machine, the spinner's GIL) keeps going."""

    rounds, width = 40, 20  # 1,600 pairs racing their completions; the spinner makes each step slow
    stall = 15.0
    out: dict[int, object] = {}
    progress = [0, 0]  # rounds each loop has finished

    async def one():
        p = Pair(unix_pair)
        p.app.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        r = await impl.relay(p.client, p.upstream, idle_timeout=None)
        p.close_ends()
        return r.ended

    async def main(i):
        for _ in range(rounds):
            assert await asyncio.gather(*(one() for _ in range(width))) == [RelayEnd.DONE] * width
            progress[i] += 1
        return rounds

    def worker(i):
        try:
            out[i] = uvloop.run(main(i))
        except BaseException as exc:  # reported below
            out[i] = exc

    def spin():
        # Holds the GIL for whole switch intervals: a loop thread coming back from the engine's
        # mutex then waits for it while the engine finishes its pair and the other loop wakes.
        while len(out) < 2 and not stalled:
            pass

    # Daemon threads: a loop whose completion was lost waits for ever, and must not hold up the exit.
    stalled = False
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
    spinner = threading.Thread(target=spin, daemon=True)
    for t in [*threads, spinner]:
        t.start()
    seen, last_change = list(progress), time.monotonic()
    while any(t.is_alive() for t in threads):
        threads[0].join(0.5)
        if progress != seen:
            seen, last_change = list(progress), time.monotonic()
        elif time.monotonic() - last_change > stall:
            stalled = True
            break
    spinner.join()
    for i in range(2):
        out.setdefault(i, f"hung after {progress[i]} rounds")
    assert out == {0: rounds, 1: rounds}, out


EXIT_SCRIPT = """
import asyncio, socket, sys, uvloop
from zep.{module} import relay, start
start()
ends = []
async def main():
    a, c = socket.socketpair()
    u, b = socket.socketpair()
    ends.extend((a, b))
    for s in (c, u, b):
        s.setblocking(False)
    asyncio.ensure_future(relay(c, u, idle_timeout=None))
    a.send(b"x")
    await asyncio.get_running_loop().sock_recv(b, 1)  # the pair is running
loop = uvloop.new_event_loop()
loop.run_until_complete(main())
sys.exit(0)  # the relay is still running: the process must still exit
"""


def test_process_exits_with_pairs_running(impl):

    module = impl.__name__.rsplit(".", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT.format(module=module)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


# -- the compiled engine only ------------------------------------------------------------


@contextlib.contextmanager
def restarted(engine, **tuning):
    """The engine stopped and started again with `tuning`; the default one again afterwards."""
    engine.stop()
    try:
        engine.start(**tuning)
        yield
    finally:
        engine.stop()
        engine.start()


def test_relay_refuses_pairs_when_not_started(engine):
    """A stopped (or never started) engine refuses the pair with RelayUnavailable, resets the
    client and closes the upstream."""

    async def main():
        p = Pair()
        with pytest.raises(RelayUnavailable):
            await engine.relay(p.client, p.upstream, idle_timeout=None)
        ends = await asyncio.gather(recv_until_end(p.app), recv_until_end(p.server))
        p.close_ends()
        return ends

    engine.stop()
    try:
        assert not engine.ready()
        (_, app_err), (server_got, server_err) = run(main())
    finally:
        engine.start()
    assert engine.ready()
    assert isinstance(app_err, ConnectionResetError), app_err
    assert (server_got, server_err) == (b"", None)


def test_stop_removes_the_completion_reader_from_every_loop(engine):
    """One loop in this thread (not running when stop() is called), one running in another."""
    a_loop = uvloop.new_event_loop()
    b_loop = uvloop.new_event_loop()
    b_thread = threading.Thread(target=b_loop.run_forever, daemon=True)

    async def one_pair():
        p = Pair()
        p.app.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        r = await engine.relay(p.client, p.upstream, idle_timeout=None)
        p.close_ends()
        return r.ended

    async def reader_gone(fd):
        return not asyncio.get_running_loop().remove_reader(fd)

    try:
        assert a_loop.run_until_complete(one_pair()) is RelayEnd.DONE
        b_thread.start()
        assert asyncio.run_coroutine_threadsafe(one_pair(), b_loop).result(STATE_TIMEOUT) is RelayEnd.DONE
        with restarted(engine):
            # The new engine's completion eventfd is likely to reuse the old number; a stale
            # reader on it would be the old engine's.
            fd = os.eventfd(0)
            os.close(fd)
        assert a_loop.run_until_complete(reader_gone(fd))
        assert asyncio.run_coroutine_threadsafe(reader_gone(fd), b_loop).result(STATE_TIMEOUT)
        # and both loops relay with the new engine
        assert a_loop.run_until_complete(one_pair()) is RelayEnd.DONE
        assert asyncio.run_coroutine_threadsafe(one_pair(), b_loop).result(STATE_TIMEOUT) is RelayEnd.DONE
    finally:
        b_loop.call_soon_threadsafe(b_loop.stop)
        b_thread.join(STATE_TIMEOUT)
        b_loop.close()
        a_loop.close()


@pytest.mark.parametrize("asked", [100_000, 4 * MiB])
def test_pipe_size_is_what_the_kernel_granted(engine, asked):
    """A size that is not a whole number of pages is rounded up; one above pipe-max-size is
    refused to unprivileged users. The engine uses, and reports, what the kernel granted."""
    r, w = os.pipe()
    try:
        try:
            granted = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, asked)
        except PermissionError:
            granted = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(r)
        os.close(w)
    with restarted(engine, pipe_size=asked):
        sent, stats = _absorbed(engine, "down")
    assert stats["pipe_size"] == granted
    assert 0 < stats["pipe_bytes_max"] <= granted
    assert sent < 8 * MiB + granted


START_UNDER_LIMIT = """
import os, resource, sys
from zep import _relay
from zep.relay_result import RelayUnavailable

def kinds():
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the directory listing's own fd
            pass
    return sorted(link for link in links if "eventpoll" in link or "eventfd" in link or "pipe" in link)

before = kinds()
fds = len(os.listdir("/proc/self/fd"))
failures = []
for spare in range(5):  # fail at each step of the start in turn: epoll, 2 eventfds, the pipe
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds + spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        _relay.start()
    except RelayUnavailable as exc:
        failures.append(str(exc))
        assert not _relay.ready()
        assert kinds() == before, (spare, kinds(), before)
        continue
    break
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
_relay.start()
assert _relay.ready()
print(len(failures))
print(failures[0])
"""


def test_start_that_fails_closes_what_it_opened(engine):
    """With the open-files limit a few descriptors above what the process holds, the engine's
    start fails at each of its steps in turn: each failure raises RelayUnavailable and leaves no
    descriptor behind, and a start with room succeeds."""
    proc = subprocess.run([sys.executable, "-c", START_UNDER_LIMIT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    count, first = proc.stdout.splitlines()
    assert int(count) >= 4  # epoll, sq eventfd, cq eventfd, the two ends of the first pipe
    assert first.startswith("cannot start the compiled relay: Too many open files (EMFILE)"), first


@pytest.mark.parametrize("make", [tcp_pair, unix_pair], ids=["tcp", "unix"])
def test_copy_fallback_forced(engine, make):
    """The recv/send fallback (used where splice says EINVAL), forced by the test hook."""
    up = os.urandom(MiB) * 20 + b"end"
    down = os.urandom(3 * MiB)
    before = engine.stats()

    async def main():
        p = Pair(make)
        t = asyncio.ensure_future(engine.relay(p.client, p.upstream, to_upstream=b"E", idle_timeout=30))
        res = await asyncio.gather(send_all(p.app, up), recv_all(p.server), send_all(p.server, down), recv_all(p.app))
        r = await t
        p.close_ends()
        return r, res

    engine._set_splice(False)
    try:
        r, res = run(main())
    finally:
        engine._set_splice(True)
    after = engine.stats()
    assert res[1] == (len(up) + 1, sha(b"E" + up))
    assert res[3] == (len(down), sha(down))
    assert r.ended is RelayEnd.DONE
    assert after["copy_directions"] - before["copy_directions"] == 2


def test_seqpacket_pair(engine):
    """A socket type splice may refuse: whatever the kernel says, bytes arrive."""
    data = [os.urandom(1000) for _ in range(200)]

    async def main():
        loop = asyncio.get_running_loop()
        app, client = unix_pair(socket.SOCK_SEQPACKET)
        upstream, server = unix_pair(socket.SOCK_SEQPACKET)
        t = asyncio.ensure_future(engine.relay(client, upstream, idle_timeout=30))
        for d in data:
            await loop.sock_sendall(app, d)
        app.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        got = await recv_until_end(server)
        r = await t
        app.close()
        server.close()
        return r, got

    r, got = run(main())
    assert got == (b"".join(data), None)
    assert r.ended is RelayEnd.DONE and r.bytes_up == 200_000


def test_idle_pairs_hold_no_pipe(engine):
    async def main():
        loop = asyncio.get_running_loop()
        pairs = [Pair() for _ in range(50)]
        tasks = [asyncio.ensure_future(engine.relay(p.client, p.upstream, idle_timeout=None)) for p in pairs]
        # Some traffic on each, fully delivered, then quiet.
        for p in pairs:
            await loop.sock_sendall(p.app, b"x" * 100_000)
            await recv_exact(p.server, 100_000)
        s = engine.stats()
        for p in pairs:
            p.app.shutdown(socket.SHUT_WR)
            p.server.shutdown(socket.SHUT_WR)
        await asyncio.gather(*tasks)
        for p in pairs:
            p.close_ends()
        return s

    s = run(main())
    assert s["pairs"] >= 50
    assert s["pipes_in_use"] == 0
    assert s["pipes_pooled"] <= s["pipe_pool_cap"]


@pytest.mark.parametrize("make", [tcp_pair, unix_pair], ids=["tcp", "unix"])
def test_small_messages_copy_then_bulk_splices_then_back(engine, make):
    """Small reads are copied (no pipe), a read that fills the small buffer
    switches the direction to splice, and a run of small reads switches back."""
    loop_msgs = [os.urandom(1 + i % 200) for i in range(300)]
    bulk = os.urandom(8 * MiB)

    async def pingpong(p):
        for m in loop_msgs:
            await asyncio.get_running_loop().sock_sendall(p.app, m)
            assert await recv_exact(p.server, len(m)) == m
            await asyncio.get_running_loop().sock_sendall(p.server, m[::-1])
            assert await recv_exact(p.app, len(m)) == m[::-1]

    async def main():
        p = Pair(make)
        t = asyncio.ensure_future(engine.relay(p.client, p.upstream, idle_timeout=30))
        s0 = engine.stats()
        await pingpong(p)
        s1 = engine.stats()
        got = await asyncio.gather(send_all(p.app, bulk, eof=False), recv_exact(p.server, len(bulk)))
        assert got[1] == bulk
        s2 = engine.stats()
        await pingpong(p)
        s3 = engine.stats()
        await asyncio.gather(send_all(p.app, b"", eof=True), send_all(p.server, b"", eof=True))
        assert await recv_until_end(p.app) == (b"", None)
        assert await recv_until_end(p.server) == (b"", None)
        r = await t
        p.close_ends()
        return r, (s0, s1, s2, s3)

    r, (s0, s1, s2, s3) = run(main())
    small = sum(map(len, loop_msgs))
    assert r.ended is RelayEnd.DONE
    assert (r.bytes_up, r.bytes_down) == (2 * small + len(bulk), 2 * small)
    # small messages: copied, no pipe
    assert s1["copy_bytes"] - s0["copy_bytes"] == 2 * small
    assert s1["splice_bytes"] == s0["splice_bytes"]
    assert s1["pipes_in_use"] == 0
    # bulk: spliced after the first full buffer
    assert s2["small_to_splice"] - s1["small_to_splice"] == 1
    assert s2["splice_bytes"] - s1["splice_bytes"] > len(bulk) // 2
    # small again: back to copying
    assert s3["splice_to_small"] - s2["splice_to_small"] == 1
    assert s3["copy_bytes"] - s2["copy_bytes"] > small
    assert s3["copy_directions"] == s0["copy_directions"]


@pytest.mark.parametrize("make", [tcp_pair, unix_pair], ids=["tcp", "unix"])
@pytest.mark.parametrize("size", [1, 100, 16383, 16384, 16385, 50_000])
def test_bytes_and_eof_queued_before_start(engine, make, size):
    """Data and the FIN both waiting when the pair starts: a short read must not
    be taken for "nothing more to come" (no further edge follows a FIN)."""
    up, down = os.urandom(size), os.urandom(size // 2 + 1)

    async def main():
        p = Pair(make)
        p.app.sendall(up)
        p.app.shutdown(socket.SHUT_WR)
        p.server.sendall(down)
        p.server.shutdown(socket.SHUT_WR)
        await until(lambda: queued(p.client) == len(up) and queued(p.upstream) == len(down)
                    and polled(p.client) & polled(p.upstream) & select.POLLRDHUP, "bytes and FINs queued")
        t = asyncio.ensure_future(engine.relay(p.client, p.upstream, idle_timeout=30))
        res = await asyncio.gather(recv_all(p.server), recv_all(p.app))
        r = await t
        p.close_ends()
        return r, res

    r, (got_up, got_down) = run(main())
    assert got_up == (len(up), sha(up))
    assert got_down == (len(down), sha(down))
    assert r.ended is RelayEnd.DONE


def test_many_pairs_small_messages_interleaved(engine):
    """Many pairs exchanging small messages at once (batched submits and
    completions): every byte arrives, every pair finishes."""

    async def one(i):
        loop = asyncio.get_running_loop()
        p = Pair()
        t = asyncio.ensure_future(engine.relay(p.client, p.upstream, idle_timeout=30))
        for j in range(20):
            m = os.urandom(1 + (i * 7 + j) % 300)
            await loop.sock_sendall(p.app, m)
            assert await recv_exact(p.server, len(m)) == m
            await loop.sock_sendall(p.server, m)
            assert await recv_exact(p.app, len(m)) == m
        p.app.shutdown(socket.SHUT_WR)
        p.server.shutdown(socket.SHUT_WR)
        assert await recv_until_end(p.app) == (b"", None)
        assert await recv_until_end(p.server) == (b"", None)
        r = await t
        p.close_ends()
        return r.ended

    async def main():
        return await asyncio.gather(*(one(i) for i in range(100)))

    assert run(main()) == [RelayEnd.DONE] * 100
    s = engine.stats()
    assert s["pipes_in_use"] == 0 and s["active"] == 0
