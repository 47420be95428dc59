"""A small process supervisor: it starts worker processes, restarts one that dies, says when all
are ready, passes SIGTERM/SIGINT on, and stops them all within a bound.

A worker is a process that owns a set of identities and relays for them. `zep serve --workers N`
runs N identical ones (zep.pool); a front process and one worker per tenant are meant to run under
this same supervisor, so nothing here knows what a worker does. A `WorkerSpec` says how to start
it, its `RestartPolicy` what to do when it ends, and each worker talks to the supervisor over its
own control channel: a Unix SOCK_SEQPACKET socket pair whose other end the worker inherits (its
command line gets `--channel-fd N`), one JSON object per packet:

- supervisor -> worker: the spec's `hello`, first (zep: the worker's settings, secrets included,
  so that they never appear on a command line or in an environment);
- worker -> supervisor: `{"ready": {...}}` once it serves, `{"error": "one line"}` before it exits
  because it cannot start as configured;
- a question and its answer (Supervisor.ask): `{"ask": N, ...}` to the worker, `{"answer": N, ...}`
  back, waited for within a bound (zep: a scrape of the worker's metrics);
- end of file: the other side is gone. A worker whose supervisor has died stops.

The supervisor runs a plain asyncio loop for its signals, channels and timers and nothing else: it
never loads an identity, never imports the Ziti SDK and never accepts a connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("zep.supervisor")

# Large enough for any hello (settings with a base64 identity are a few KiB).
MAX_MESSAGE = 1 << 20
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 0.5  # seconds before restarting a worker that died
    max_delay: float = 30.0  # the delay doubles with each death, up to this
    stable_after: float = 60.0  # a worker that was up this long starts over at first_delay
    fatal_status: int = 2  # a worker that exits so before it is ready cannot start as configured


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # how the logs and the ready file name it: "1", "2", ... (later "front", a tenant)
    role: str  # what it does: "proxy" (later "front", "tenant")
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    hello: Mapping[str, Any] = field(repr=False)  # the first message on its channel
    restart: RestartPolicy = RestartPolicy()


class Worker:
    """A spec's current process (if any), its channel and its restart state."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.channel: socket.socket | None = None
        self.ready: dict[str, Any] | None = None  # its ready message, since it last started
        self.error: str | None = None  # its last error message
        self.started = 0.0
        self.delay = spec.restart.first_delay
        self.restart_timer: asyncio.TimerHandle | None = None
        self.restarts = 0  # how often it was started again after it ended

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __str__(self) -> str:
        return f"worker {self.spec.name} (pid {self.pid})" if self.proc else f"worker {self.spec.name}"


AllReady = Callable[[Sequence[Worker]], None]
# Started on the supervisor's loop before the workers (zep: the admin listener); returns its closer.
Service = Callable[["Supervisor"], Awaitable[Callable[[], None]]]


class Supervisor:
    """Run the workers until a stop signal (exit 0 when they all stop when told, 1 when one had to
    be killed or failed) or until one cannot start as configured (exit 2)."""

    def __init__(self, specs: Sequence[WorkerSpec], *, on_all_ready: AllReady, stop_timeout: float,
                 service: Service | None = None) -> None:
        self.workers = [Worker(spec) for spec in specs]
        self.on_all_ready = on_all_ready
        self.service = service
        self._asked = 0
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.stop_timeout = stop_timeout  # after the stop signal, this long until SIGKILL
        self.exit_code = 0
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._passed_on: set[int] = set()  # the stop signals sent to the workers

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        close = await self.service(self) if self.service is not None else None
        try:
            for worker in self.workers:
                self._start(worker)
            await self._done
        finally:
            if close is not None:
                close()
        return self.exit_code

    def why_not_ready(self) -> str | None:
        """None when every worker serves and no stop signal has come; else why not."""
        if self.stopping:
            return "draining"
        waiting = [f"worker {w.spec.name} {'restarting' if w.restarts or w.restart_timer else 'starting'}"
                   for w in self.workers if w.ready is None]
        return ", ".join(waiting) or None

    async def ask(self, worker: Worker, question: Mapping[str, Any], timeout: float) -> dict[str, Any] | None:
        """The worker's answer to `question`; None when it is not ready or does not answer within `timeout`."""
        assert self._loop is not None
        if worker.channel is None or worker.ready is None:
            return None
        self._asked += 1
        token = self._asked
        answer = self._answers[token] = self._loop.create_future()
        try:
            worker.channel.send(json.dumps({**question, "ask": token}).encode())
            async with asyncio.timeout(timeout):
                return await answer
        except (OSError, TimeoutError):
            return None
        finally:
            del self._answers[token]

    # ------------------------------------------------------------------------- starting

    def _start(self, worker: Worker) -> None:
        assert self._loop is not None
        spec = worker.spec
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.sendall(json.dumps(dict(spec.hello)).encode())  # the buffer is empty: this cannot block
            worker.proc = subprocess.Popen(
                [*spec.argv, "--channel-fd", str(theirs.fileno())], env=dict(spec.env),
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            self._schedule_restart(worker, f"could not be started ({exc.strerror or exc})", 0.0)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.channel = ours
        worker.ready = None
        worker.error = None
        worker.started = time.monotonic()
        self._loop.add_reader(ours.fileno(), self._on_message, worker)
        log.info("%s started as %s", worker, spec.role)

    def _on_message(self, worker: Worker) -> None:
        assert self._loop is not None and worker.channel is not None
        data = receive(worker.channel)
        if data is None:
            return
        if not data:  # the worker is gone or going; its exit arrives as SIGCHLD
            self._loop.remove_reader(worker.channel.fileno())
            return
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            log.warning("%s sent a message that is not a JSON object; ignored", worker)
            return
        if "answer" in message:
            answer = self._answers.get(message["answer"]) if isinstance(message["answer"], int) else None
            if answer is not None and not answer.done():
                answer.set_result(message)
            return
        if "error" in message:
            worker.error = str(message["error"])
        if "ready" in message:
            worker.ready = dict(message["ready"])
            log.info("%s ready", worker)
            if not self.stopping and all(w.ready is not None for w in self.workers):
                log.info("all %d workers ready", len(self.workers))
                self.on_all_ready(self.workers)

    # ------------------------------------------------------------------------- endings

    def _reap(self) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is not None:
                self._exited(worker)

    def _exited(self, worker: Worker) -> None:
        assert self._loop is not None and worker.proc is not None
        status = worker.proc.returncode
        how = describe_status(status)
        name = str(worker)
        uptime = time.monotonic() - worker.started
        was_ready = worker.ready is not None
        if worker.channel is not None:
            self._loop.remove_reader(worker.channel.fileno())
            worker.channel.close()
            worker.channel = None
        worker.proc = None
        worker.ready = None
        if self.stopping:
            log.info("%s %s", name, how)
            if status != 0 and -status not in self._passed_on:  # dying of the signal passed on is stopping too
                self.exit_code = self.exit_code or 1
            self._finish_if_all_exited()
        elif status == worker.spec.restart.fatal_status and not was_ready:
            # A configuration problem: starting it again would fail the same way, so stop everything.
            print(f"zep: error: {worker.error or f'{name} {how} before it was ready'}", file=sys.stderr, flush=True)
            log.error("%s cannot start as configured; stopping all workers", name)
            self._stop(signal.SIGTERM, exit_code=2)
        else:
            self._schedule_restart(worker, f"{how} after {uptime:.1f} s", uptime, name)

    def _schedule_restart(self, worker: Worker, why: str, uptime: float, name: str | None = None) -> None:
        assert self._loop is not None
        policy = worker.spec.restart
        if uptime >= policy.stable_after:
            worker.delay = policy.first_delay
        delay = worker.delay
        worker.delay = min(delay * 2, policy.max_delay)
        log.warning("%s %s; restarting it in %g s", name or worker, why, delay)
        worker.restart_timer = self._loop.call_later(delay, self._restart, worker)

    def _restart(self, worker: Worker) -> None:
        worker.restart_timer = None
        if not self.stopping:
            worker.restarts += 1
            self._start(worker)

    # ------------------------------------------------------------------------- stopping

    def stop(self, exit_code: int) -> None:
        """Stop every worker as SIGTERM would, and exit with `exit_code` (unless a worse one comes)."""
        self._stop(signal.SIGTERM, exit_code)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            log.info("%s again: passing it on to the workers still running", name)
        else:
            log.info("%s: passing it on to the workers; exiting when all have stopped", name)
        self._stop(signum)

    def _stop(self, signum: int, exit_code: int = 0) -> None:
        assert self._loop is not None
        first = not self.stopping
        self.stopping = True
        self.exit_code = self.exit_code or exit_code
        self._passed_on.add(signum)
        for worker in self.workers:
            if worker.restart_timer is not None:
                worker.restart_timer.cancel()
                worker.restart_timer = None
            if worker.proc is not None:
                worker.proc.send_signal(signum)
        if first:
            self._loop.call_later(self.stop_timeout, self._kill_all)
        self._finish_if_all_exited()

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.proc is not None:
                log.warning("%s still running %g s after the stop signal: killing it", worker, self.stop_timeout)
                worker.proc.kill()
                self.exit_code = self.exit_code or 1

    def _finish_if_all_exited(self) -> None:
        assert self._done is not None
        if all(worker.proc is None for worker in self.workers) and not self._done.done():
            self._done.set_result(None)


def receive(channel: socket.socket) -> bytes | None:
    """One packet from a readable channel: b"" at its end (a reset is an end too), None if none after all."""
    try:
        return channel.recv(MAX_MESSAGE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def describe_status(returncode: int) -> str:
    """A Popen return code in words: "exited with status 2", "killed by SIGKILL"."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
