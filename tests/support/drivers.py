"""Running one connection in process on any driver: the coroutine `Driver`, the fast path, or (SOCKS5
with the compiled relay) the relay engine's handshake."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zep.accesslog import AccessRecord
from zep.driver import Driver
from zep.exchange import Command, Exchange
from zep.fastpath import FastConnection
from zep import relay
from zep.nativepath import EngineFront, NativeSocks
from zep.server import Context

LOOP_DRIVERS = ["fast", "coroutine"]  # the drivers of every protocol
DRIVERS = ["native", *LOOP_DRIVERS]  # "native": the engine's SOCKS5 handshake


class FastRun:
    """One FastConnection in a task of its own, so that a test awaits and cancels it as it does a
    driver's task; plays the server's part (zep.fastpath.Registry)."""

    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()
        self.conn: FastConnection | NativeSocks | None = None
        self.driver: Driver | None = None
        self.driver_task: asyncio.Task[None] | None = None

    def drain(self) -> None:
        if self.driver is not None:
            self.driver.drain()
        else:
            self.conn.drain()

    def finished(self, conn: FastConnection) -> None:
        self.closed.set_result(None)

    def hand_over(self, conn: FastConnection, driver: Driver, commands: list[Command]) -> None:
        self.driver = driver
        self.driver_task = asyncio.get_running_loop().create_task(driver.run(commands))
        self.driver_task.add_done_callback(lambda _: self.closed.set_result(None))

    def replaced(self, old: NativeSocks, new: FastConnection) -> None:
        self.conn = new

    async def run(self, conn: FastConnection | NativeSocks, start: Callable[[], None]) -> None:
        self.conn = conn
        start()
        try:
            await asyncio.shield(self.closed)
        except asyncio.CancelledError:
            if self.driver_task is not None:
                self.driver_task.cancel()
            else:
                self.conn.cancel()
            await self.closed
            raise
        if self.driver_task is not None:
            self.driver_task.result()


@dataclass
class Running:
    task: asyncio.Task[None]
    drain: Callable[[], None]


def start(driver: str, ctx: Context, sock: socket.socket, kind: str, exchange: Exchange) -> Running:
    """Drive `exchange` on `sock` with the driver named (one of DRIVERS; "native" for SOCKS5 only,
    where `exchange` is what the engine gives the connection back to, if it does)."""
    loop, record = asyncio.get_running_loop(), AccessRecord("test", kind)
    if driver == "coroutine":
        coroutine = Driver(ctx, sock, record, exchange)
        return Running(loop.create_task(coroutine.run()), coroutine.drain)
    run = FastRun()
    if driver == "native":
        assert ctx.start_socks is not None and relay.Verdicts is not None, "the native driver needs the compiled relay"
        native = NativeSocks(ctx, EngineFront.of(ctx, relay.Verdicts()), record,
                             lambda _ctx: exchange, run)
        task = loop.create_task(run.run(native, lambda: native.start(sock.detach(), loop)))
    else:
        fast = FastConnection(ctx, sock, record, exchange, run)
        task = loop.create_task(run.run(fast, fast.start))
    return Running(task, run.drain)


async def read_until_closed(sock: socket.socket, limit: float = 5) -> bytes:
    """What the client end reads until zep closes; a reset shows as b"<reset>" at the end."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(limit):
        while True:
            try:
                block = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                return data + b"<reset>"
            if not block:
                return data
            data += block
