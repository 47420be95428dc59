"""Handing a client connection to another process: the fd, the header and the pending bytes arrive whole."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap

import pytest

from zep import handoff
from zep.handoff import Handoff, HandoffError


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """(client, accepted) over real loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
    return client, accepted


def test_encode_decode_keeps_every_field_and_byte():
    original = Handoff("team-a", "http", "127.0.0.1:5000", "ci", b"CONNECT a:1 HTTP/1.1\r\n\r\n\x16\x03\x01")
    assert handoff.decode(handoff.encode(original)) == original


@pytest.mark.parametrize("message", [b"", b"\x00\x00\x00\x09{}", b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x02{}"])
def test_garbage_is_a_handoff_error(message):
    with pytest.raises(HandoffError):
        handoff.decode(message)


def test_too_large_is_refused_before_sending():
    with pytest.raises(HandoffError, match="larger than"):
        handoff.encode(Handoff("t", "socks5", "c", "u", b"x" * handoff.MAX_HANDOFF_BYTES))


def test_a_connection_moves_to_another_process_and_keeps_working():
    """The child receives the accepted socket, reads what the client sends next and answers on it."""
    front, worker = handoff.channel_pair()
    child_code = textwrap.dedent("""
        import select, socket, sys
        from zep import handoff
        channel = socket.socket(fileno=int(sys.argv[1]))
        select.select([channel], [], [], 10)
        sock, h = handoff.receive(channel)
        sock.setblocking(True)
        more = sock.recv(100)
        sock.sendall(h.tenant.encode() + b"|" + h.user.encode() + b"|" + h.pending + b"|" + more)
        sock.close()
    """)
    child = subprocess.Popen([sys.executable, "-c", child_code, str(worker.fileno())], pass_fds=[worker.fileno()])
    worker.close()
    client, accepted = connected_pair()
    try:
        asyncio.run(handoff.send(front, accepted, Handoff("team-a", "socks5", "127.0.0.1:1", "alice", b"early")))
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
    front, worker = handoff.channel_pair()
    assert handoff.receive(worker) is None
    front.close()
    with pytest.raises(HandoffError, match="closed"):
        handoff.receive(worker)
    worker.close()


def test_a_datagram_without_a_connection_is_refused():
    front, worker = handoff.channel_pair()
    front.send(handoff.encode(Handoff("t", "http", "c", "u")))
    with pytest.raises(HandoffError, match="exactly one connection, got 0"):
        handoff.receive(worker)
    front.close()
    worker.close()


def test_send_to_a_closed_worker_is_a_handoff_error():
    front, worker = handoff.channel_pair()
    worker.close()
    client, accepted = connected_pair()
    with pytest.raises(HandoffError, match="closed"):
        asyncio.run(handoff.send(front, accepted, Handoff("t", "http", "c", "u")))
    for sock in (client, accepted, front):
        sock.close()
