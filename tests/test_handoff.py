"""Handing a client connection to another process: the fd, the header and the bytes arrive whole; a
worker's listener and the front's link to it, which reconnects after the worker was replaced."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from zep import handoff
from zep.handoff import Handoff, HandoffError


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(front end, worker end) of a connected hand-off channel, both non-blocking."""
    front, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (front, worker):
        end.setblocking(False)
    return front, worker


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """(client, accepted) over real loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
    return client, accepted


def test_encode_decode_keeps_every_field_and_byte():
    original = Handoff("team-a", "http", "127.0.0.1:5000", "ci", "pä\udcff", b"CONNECT a:1 HTTP/1.1\r\n\r\n\x16\x03\x01",
                       b"\x05\x02\x01\x00")
    assert handoff.decode(handoff.encode(original)) == original
    assert "pä" not in repr(original)


@pytest.mark.parametrize("message", [b"", b"\x00\x00\x00\x09{}", b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x02{}"])
def test_garbage_is_a_handoff_error(message):
    with pytest.raises(HandoffError):
        handoff.decode(message)


def test_too_large_is_refused_before_sending():
    with pytest.raises(HandoffError, match="larger than"):
        handoff.encode(Handoff("t", "socks5", "c", "u", received=b"x" * handoff.MAX_HANDOFF_BYTES))


def test_a_connection_moves_to_another_process_and_keeps_working():
    """The child receives the accepted socket, reads what the client sends next and answers on it."""
    front, worker = channel_pair()
    child_code = textwrap.dedent("""
        import select, socket, sys
        from zep import handoff
        channel = socket.socket(fileno=int(sys.argv[1]))
        select.select([channel], [], [], 10)
        sock, h = handoff.receive(channel)
        sock.setblocking(True)
        more = sock.recv(100)
        sock.sendall(h.tenant.encode() + b"|" + h.user.encode() + b"|" + h.received + b"|" + more)
        sock.close()
    """)
    child = subprocess.Popen([sys.executable, "-c", child_code, str(worker.fileno())], pass_fds=[worker.fileno()])
    worker.close()
    client, accepted = connected_pair()
    try:
        asyncio.run(handoff.send(front, accepted, Handoff("team-a", "socks5", "127.0.0.1:1", "alice", received=b"early")))
        accepted.close()  # the front lets go: the worker's copy keeps the connection open
        client.sendall(b"later")
        answer = b""
        while chunk := client.recv(100):
            answer += chunk
        assert answer == b"team-a|alice|early|later"
        assert child.wait(10) == 0
    finally:
        client.close()
        front.close()
        if child.poll() is None:
            child.kill()


def test_receive_when_nothing_waits_and_after_the_front_closed():
    front, worker = channel_pair()
    assert handoff.receive(worker) is None
    front.close()
    with pytest.raises(HandoffError, match="closed"):
        handoff.receive(worker)
    worker.close()


def test_a_datagram_without_a_connection_is_refused():
    front, worker = channel_pair()
    front.send(handoff.encode(Handoff("t", "http", "c", "u")))
    with pytest.raises(HandoffError, match="exactly one connection, got 0"):
        handoff.receive(worker)
    front.close()
    worker.close()


def test_send_to_a_closed_worker_is_a_handoff_error():
    front, worker = channel_pair()
    worker.close()
    client, accepted = connected_pair()
    with pytest.raises(HandoffError, match="closed"):
        asyncio.run(handoff.send(front, accepted, Handoff("t", "http", "c", "u")))
    for sock in (client, accepted, front):
        sock.close()


def test_a_link_reaches_a_listener_and_finds_its_replacement(tmp_path):
    """The front's link connects when first used; after the worker's listener is gone the link says
    so, and once a new listener has the same path (a restarted worker) the next hand-off reaches it."""
    path = str(tmp_path / "team-a.sock")
    link = handoff.WorkerLink("team-a", path)

    async def scenario() -> list[str]:
        got: list[tuple[socket.socket, Handoff]] = []
        arrived = asyncio.Event()

        def on_handoff(sock: socket.socket, h: Handoff) -> None:
            got.append((sock, h))
            arrived.set()

        async def hand_off(n: int) -> tuple[socket.socket, socket.socket]:
            client, accepted = connected_pair()
            await link.send(accepted, Handoff("team-a", "http", "c", f"user-{n}", "pw", b"GET", b""))
            accepted.close()
            return client, accepted

        outcomes = []
        with pytest.raises(HandoffError, match="cannot reach the worker of tenant team-a: it is not listening"):
            await hand_off(0)
        for generation in (1, 2):
            listener = handoff.HandoffListener(path, on_handoff)
            listener.start()
            client, _ = await hand_off(generation)
            await asyncio.wait_for(arrived.wait(), 10)
            arrived.clear()
            sock, h = got.pop()
            sock.setblocking(True)
            sock.sendall(h.user.encode())
            sock.close()
            client.settimeout(10)
            outcomes.append(client.recv(100).decode())
            client.close()
            listener.close()  # the worker dies
            assert not os.path.exists(path)
        with pytest.raises(HandoffError, match="not listening"):
            await hand_off(3)
        return outcomes

    try:
        assert asyncio.run(scenario()) == ["user-1", "user-2"]
    finally:
        link.close()


def test_a_listener_drops_a_channel_that_sends_garbage_and_keeps_serving(tmp_path):
    path = str(tmp_path / "t.sock")

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[Handoff] = loop.create_future()
        listener = handoff.HandoffListener(path, lambda sock, h: (sock.close(), got.set_result(h)))
        listener.start()
        rogue = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rogue.setblocking(False)
        rogue.connect(path)
        rogue.send(b"not a hand-off")
        assert await asyncio.wait_for(loop.sock_recv(rogue, 100), 10) == b""  # dropped by the listener
        link = handoff.WorkerLink("t", path)
        client, accepted = connected_pair()
        await link.send(accepted, Handoff("t", "socks5", "c", "u"))
        h = await asyncio.wait_for(got, 10)
        for sock in (rogue, client, accepted):
            sock.close()
        link.close()
        listener.close()
        return h.user

    assert asyncio.run(scenario()) == "u"
