"""Moving an exchange from the front to a tenant's worker by replaying it.

An exchange is deterministic: the same client bytes give the same commands. So the front does not
send its exchange's state to the worker, only what the exchange was given and what it said
(`Recorder`): every byte read from the client, and the bytes already sent back. The worker feeds
those bytes to a fresh exchange of the same protocol (`Replay`), which regenerates the front's
answers; the ones the client already has are checked against what the front sent and dropped,
and from there on the exchange runs as if it had been in the worker from the start (it asks to
dial, now through the tenant's own router).
"""

from __future__ import annotations

from zep.exchange import ClientData, Close, Command, Event, Exchange, Log, Login, Report, SendClient
from zep.outcome import Outcome


class _Wrapper:
    """An exchange around another one: reads the sides the inner exchange wants."""

    __slots__ = ("inner",)

    def __init__(self, inner: Exchange) -> None:
        self.inner = inner

    @property
    def wants_client(self) -> bool:
        return self.inner.wants_client

    @property
    def wants_upstream(self) -> bool:
        return self.inner.wants_upstream


class Recorder(_Wrapper):
    """The front's exchange, wrapped: keeps what the client sent and what the exchange answered."""

    __slots__ = ("received", "answered")

    def __init__(self, inner: Exchange) -> None:
        super().__init__(inner)
        self.received = bytearray()
        self.answered = bytearray()

    def start(self) -> list[Command]:
        return self._said(self.inner.start())

    def handle(self, event: Event) -> list[Command]:
        if type(event) is ClientData:
            self.received += event.data
        return self._said(self.inner.handle(event))

    def _said(self, commands: list[Command]) -> list[Command]:
        for command in commands:
            if type(command) is SendClient:
                self.answered += command.data
        return commands


class Replay(_Wrapper):
    """The worker's exchange for a handed-off connection: `inner` (fresh) is fed `received` at
    start, and the first `len(sent)` bytes it sends the client are dropped, once checked to be
    exactly `sent`; so is its Login (the throttle counted it in the front), unless `logins_counted`
    is false. Were the bytes not the same (the two disagree), the connection is reset rather than
    the client given a corrupted stream. Afterwards it is the inner exchange itself."""

    __slots__ = ("_received", "_sent", "_logins_counted")

    def __init__(self, inner: Exchange, received: bytes, sent: bytes, *, logins_counted: bool = True) -> None:
        super().__init__(inner)
        self._received = received
        self._sent = memoryview(sent)
        self._logins_counted = logins_counted  # False: nobody has told the throttle yet (zep.nativepath)

    def start(self) -> list[Command]:
        commands = self.inner.start()
        if self._received:
            commands += self.inner.handle(ClientData(self._received))
        out: list[Command] = []
        for command in commands:
            if type(command) is SendClient and self._sent:
                data, sent = command.data, self._sent
                n = min(len(data), len(sent))
                if data[:n] != sent[:n]:
                    return self._diverged()
                self._sent = sent[n:]
                if len(data) > n:
                    out.append(SendClient(data[n:]))
            elif type(command) is not Login or not self._logins_counted:  # the front's throttle has counted it
                out.append(command)
        # The front hands off when its exchange asks to dial, after everything it said: the
        # replay, which ends at the same point, has said it all too.
        return self._diverged() if self._sent else out

    def handle(self, event: Event) -> list[Command]:
        return self.inner.handle(event)

    @staticmethod
    def _diverged() -> list[Command]:
        return [Log(Report(Outcome.INTERNAL_ERROR, detail="the replay of a handed-off connection differs from what "
                           "the front sent the client")), Close(abort=True)]
