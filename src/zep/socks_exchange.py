"""The SOCKS5 exchange (sans-IO): handshake within the http-request timeout, dial, then a tunnel."""

from __future__ import annotations

from zep import socks5
from zep.accesslog import dial_outcome
from zep.auth import Authenticator
from zep.dial import Failure
from zep.exchange import (
    HTTP_REQUEST,
    Arm,
    Cancel,
    ClientData,
    ClientEof,
    ClientError,
    Close,
    Command,
    Dial,
    DialFailed,
    Dialed,
    Disarm,
    Event,
    Log,
    Login,
    Report,
    SendClient,
    TimerFired,
    Tunnel,
    authority,
)
from zep.outcome import Outcome


# The answers to a user/password check (RFC 1929), which the login throttle may hold.
_LOGIN_ANSWERS = {b"\x01\x00": True, b"\x01\x01": False}


class Socks5Exchange:
    __slots__ = ("wants_client", "wants_upstream", "_credentials", "_handshake", "_request", "_target")

    def __init__(self, credentials: Authenticator | None) -> None:
        self.wants_client = True
        self.wants_upstream = False
        self._credentials = credentials
        self._handshake = socks5.Socks5Handshake(credentials)
        self._request: socks5.ConnectRequest | None = None
        self._target = "-"

    def start(self) -> list[Command]:
        return [Arm(HTTP_REQUEST)]

    def handle(self, event: Event) -> list[Command]:
        kind = type(event)
        if kind is ClientData:
            return self._feed(event.data)
        if kind is Dialed:
            return self._tunnel(event)
        if kind is DialFailed:
            return [SendClient(socks5.connect_reply(event.failure.socks_reply)),
                    *self._end(dial_outcome(event.failure), event.detail, user=self._handshake.username or "-",
                               route="deny" if event.failure is Failure.NOT_ALLOWED else "-")]
        if kind is ClientEof:
            return self._end(Outcome.CLIENT_CLOSED, "client closed during the SOCKS5 handshake")
        if kind is ClientError:
            return self._end(Outcome.CLIENT_ERROR, event.reason)
        if kind is TimerFired:
            return self._end(Outcome.REQUEST_TIMEOUT, "no complete SOCKS5 request within the http-request timeout")
        if kind is Cancel:
            return self._end(Outcome.CANCELLED, "zep stopped")
        return []  # Drain: a handshake in progress may still finish within the drain timeout

    def _feed(self, data: bytes) -> list[Command]:
        commands: list[Command] = []
        for step in self._handshake.feed(data):
            if not isinstance(step, socks5.ConnectRequest) and step.data in _LOGIN_ANSWERS:
                commands.append(Login(_LOGIN_ANSWERS[step.data]))
            if isinstance(step, socks5.Send):
                commands.append(SendClient(step.data))
            elif isinstance(step, socks5.Refuse):
                if step.data:
                    commands.append(SendClient(step.data))
                outcome = Outcome.AUTH_FAILED if step.auth_failed else Outcome.BAD_REQUEST
                commands.extend(self._end(outcome, step.reason, user=self._failed_user()))
            else:
                self._request = step
                self._target = authority(step.host, step.port)
                self.wants_client = False
                commands += (Disarm(HTTP_REQUEST), Dial(step.host, step.port))
        return commands

    def _tunnel(self, dialed: Dialed) -> list[Command]:
        assert self._request is not None
        try:
            reply = socks5.connect_reply(socks5.SUCCEEDED, dialed.bound)
        except ValueError:  # a bound address that is not an IP: the client gets 0.0.0.0:0
            reply = socks5.connect_reply(socks5.SUCCEEDED)
        report = Report(Outcome.OK, self._target, dialed.route, self._handshake.username or "-")
        return [Tunnel(reply, socks5.connect_reply(socks5.GENERAL_FAILURE), self._request.early, report)]

    def _failed_user(self) -> str:
        offered = self._handshake.offered_username
        if offered is None or self._credentials is None:
            return "-"
        return self._credentials.login_name(offered)

    def _end(self, outcome: Outcome, detail: str, *, user: str = "-", route: str = "-") -> list[Command]:
        self.wants_client = False
        return [Log(Report(outcome, self._target, route, user, detail)), Close()]
