"""The HTTP proxy exchange (sans-IO): CONNECT tunnels, and absolute-form requests forwarded as if
there were no proxy, one after another on a kept-alive connection.

Forwarding: the request head goes upstream as soon as the upstream is connected, and the body
follows as the client sends it, while the upstream's response is read at the same time. A final
response that comes before the body is complete (413, 401, 417 ...) goes to the client as it is;
the rest of the body is not sent upstream, and the client connection is closed after the response.
`Expect: 100-continue` is forwarded, so the client gets the upstream's own `100` or final status.
Each request is routed on its own (a Dial each); the driver reuses the upstream connection while
requests keep going to the same host and port and it is still open, and the exchange closes it
(CloseUpstream) whenever it cannot carry another request. One access entry per request.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence

from zep import httpproxy
from zep.accesslog import dial_outcome
from zep.auth import Authenticator, parse_basic
from zep.dial import Failure
from zep.exchange import (
    CLIENT,
    HTTP_KEEP_ALIVE,
    HTTP_REQUEST,
    SERVER,
    Arm,
    ClientData,
    ClientEof,
    ClientError,
    Close,
    CloseUpstream,
    Command,
    Dial,
    DialFailed,
    Cancel,
    Dialed,
    Disarm,
    Drain,
    Event,
    Log,
    Login,
    Report,
    SendClient,
    SendUpstream,
    TimerFired,
    Tunnel,
    UpstreamData,
    UpstreamEof,
    UpstreamError,
    authority,
)
from zep.httpproxy import BadMessage, BodyChunk, MessageEnd, RequestEvent, RequestHead, ResponseEvent, ResponseHead
from zep.outcome import Outcome

PROXY_AUTHENTICATE = ("Proxy-Authenticate", 'Basic realm="zep"')
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# What a connection over the limit is told (see ProxyServer.listen).
OVERLOADED = httpproxy.error_response(503, body="zep: too many connections, try again later\n")
RELAY_UNAVAILABLE = httpproxy.error_response(503, body="zep: cannot relay a tunnel now (see zep's log)\n")


class _Phase(enum.Enum):
    IDLE = enum.auto()  # waiting for a request (its head may have begun)
    DIALING = enum.auto()
    FORWARDING = enum.auto()  # head sent upstream; body and response under way
    DONE = enum.auto()  # closed, or handed to the relay


class HttpExchange:
    def __init__(self, credentials: Authenticator | None, max_head_bytes: int) -> None:
        self.wants_client = True
        self.wants_upstream = False
        self._credentials = credentials
        self._max_head = max_head_bytes
        self._requests = httpproxy.RequestReader(max_head_bytes)
        self._pending: deque[RequestEvent] = deque()  # parsed, not yet acted on (pipelining)
        self._phase = _Phase.IDLE
        self._served = 0  # requests answered on this connection
        self._draining = False
        self._user = "-"
        # the request in hand
        self._head: RequestHead | None = None
        self._target = "-"
        self._method = ""
        self._path = ""
        self._body_read = False  # the client sent the whole request body
        self._body_stopped = False  # no more of the body goes upstream (an early response, a failed send)
        self._send_failure = ""
        # the upstream connection and its response
        self._route = "-"
        self._responses: httpproxy.ResponseReader | None = None
        self._response: ResponseHead | None = None  # the final head, once sent to the client
        self._response_seen = False  # the upstream sent at least one byte
        self._keep_client = False

    def start(self) -> list[Command]:
        return [Arm(HTTP_REQUEST)]

    # ------------------------------------------------------------------------- events

    def handle(self, event: Event) -> list[Command]:
        kind = type(event)
        if kind is ClientData:
            return self._client_data(event.data)
        if kind is UpstreamData:
            self._response_seen = True
            return self._response_events(self._responses.feed(event.data))
        if kind is Dialed:
            return self._dialed(event)
        if kind is DialFailed:
            return self._dial_failed(event)
        if kind is UpstreamEof:
            return self._response_events(self._responses.feed_eof())
        if kind is UpstreamError:
            return self._upstream_error(event)
        if kind is TimerFired:
            return self._timer_fired(event.name)
        if kind is ClientEof:
            return self._client_gone(Outcome.CLIENT_CLOSED, "client closed")
        if kind is ClientError:
            return self._client_gone(Outcome.CLIENT_ERROR, event.reason)
        if kind is Drain:
            return self._drain()
        assert kind is Cancel, event
        return self._cancel()

    def _client_data(self, data: bytes) -> list[Command]:
        commands: list[Command] = []
        if self._phase is _Phase.IDLE and self._served and self._requests.between_messages and not self._pending:
            commands += (Disarm(HTTP_KEEP_ALIVE), Arm(HTTP_REQUEST))  # a next request has begun
        self._pending.extend(self._requests.feed(data))
        return commands + self._advance()

    def _advance(self) -> list[Command]:
        """Act on parsed request events as far as the phase allows."""
        commands: list[Command] = []
        while self._pending:
            if self._phase is _Phase.IDLE:
                event = self._pending.popleft()
                if isinstance(event, BadMessage):
                    return commands + self._refuse(event.status, event.reason, Outcome.BAD_REQUEST)
                if isinstance(event, RequestHead):
                    commands += self._begin(event)
                # a BodyChunk or MessageEnd here belongs to a request already refused
            elif self._phase is _Phase.FORWARDING and not self._body_read:
                event = self._pending.popleft()
                if isinstance(event, BodyChunk):
                    if not self._body_stopped:
                        commands.append(SendUpstream(httpproxy.encode_body(event.data, self._head.chunked)))
                elif isinstance(event, MessageEnd):
                    commands += self._body_complete()
                else:
                    return commands + self._bad_body(event)
            else:
                break
        return commands

    def _begin(self, head: RequestHead) -> list[Command]:
        self._head = head
        self._method = head.method
        self._body_read = self._body_stopped = False
        self._send_failure = ""
        if head.method == "CONNECT":
            self._target, self._path = authority(head.host, head.port), ""
        else:
            self._target = "http://" + authority(head.host, head.port)
            self._path = head.target.partition(b"?")[0].decode("latin-1")  # the query may carry tokens
        commands: list[Command] = [Disarm(HTTP_REQUEST)]
        refusal = self._authenticate(head, commands)
        if refusal:
            return commands + refusal
        self._phase = _Phase.DIALING
        self.wants_client = False
        return commands + [Dial(head.host, head.port, reuse=head.method != "CONNECT")]

    def _authenticate(self, head: RequestHead, commands: list[Command]) -> list[Command]:
        """The refusal when the request's credentials do not do; a Login goes on `commands` for
        each password checked (a request without credentials is a challenge, not a guess)."""
        credentials = self._credentials
        if credentials is None:
            return []
        given = parse_basic(head.proxy_authorization)
        accepted = given is not None and credentials.matches(*given)
        if given is not None:
            commands.append(Login(accepted))
        if accepted:
            self._user = given[0]
            return []
        if given is None:
            reason = "no proxy credentials"
        else:
            reason = "proxy credentials not accepted"
            self._user = credentials.login_name(given[0])
        return self._refuse(407, reason, Outcome.AUTH_FAILED, headers=[PROXY_AUTHENTICATE])

    def _dialed(self, dialed: Dialed) -> list[Command]:
        head = self._head
        assert head is not None
        self._route = dialed.route
        if head.method == "CONNECT":
            self._phase = _Phase.DONE
            report = Report(Outcome.OK, self._target, dialed.route, self._user, method="CONNECT")
            return [Tunnel(CONNECT_ESTABLISHED, RELAY_UNAVAILABLE, self._requests.take_leftover(), report)]
        return self._send_head()

    def _dial_failed(self, failed: DialFailed) -> list[Command]:
        if failed.failure is Failure.NOT_ALLOWED:
            self._route = "deny"
        status = failed.failure.http_status
        return self._refuse(status, failed.detail, dial_outcome(failed.failure))

    def _send_head(self) -> list[Command]:
        head = self._head
        assert head is not None
        self._phase = _Phase.FORWARDING
        self._responses = httpproxy.ResponseReader(head.method, self._max_head)
        self._response = None
        self._response_seen = False
        self.wants_upstream = True  # an early answer is read while the body is still coming
        self.wants_client = True
        commands: list[Command] = [SendUpstream(head.serialize())]
        commands += self._advance()
        if not self._body_read and not self._body_stopped:
            commands.append(Arm(CLIENT))
        return commands

    def _body_complete(self) -> list[Command]:
        self._body_read = True
        self.wants_client = False
        commands: list[Command] = [Disarm(CLIENT)]
        if self._head.chunked and not self._body_stopped:
            commands.append(SendUpstream(httpproxy.end_of_body(True)))
        if self._response is None:
            commands.append(Arm(SERVER))
        return commands

    def _bad_body(self, bad: BadMessage) -> list[Command]:
        if self._response is not None:  # the answer is on its way: the client broke its own request
            return [CloseUpstream(), self._log(Outcome.BAD_REQUEST, bad.reason), Close(abort=True)]
        return [CloseUpstream(), *self._refuse(bad.status, bad.reason, Outcome.BAD_REQUEST)]

    # ------------------------------------------------------------------------- the response

    def _response_events(self, events: Sequence[ResponseEvent]) -> list[Command]:
        commands: list[Command] = []
        for event in events:
            if isinstance(event, ResponseHead):
                if event.status < 200:
                    commands.append(SendClient(event.serialize(keep_alive=True)))
                    continue
                commands += self._final_head(event)
            elif isinstance(event, BodyChunk):
                commands.append(SendClient(httpproxy.encode_body(event.data, self._response.chunked)))
            elif isinstance(event, MessageEnd):
                if self._response is not None:  # else the end of an interim (1xx) response
                    if self._response.chunked:
                        commands.append(SendClient(httpproxy.end_of_body(True)))
                    commands += self._response_complete()
            else:
                return commands + self._upstream_failed(event.reason)
        return commands

    def _final_head(self, head: ResponseHead) -> list[Command]:
        self._response = head
        commands: list[Command] = [Arm(SERVER)]
        if not self._body_read and not self._body_stopped:
            # An early answer: like the origin would, it ends the request; what is left of the body
            # is not sent, and the client connection cannot carry another request.
            self._body_stopped = True
            self.wants_client = False
            commands.append(Disarm(CLIENT))
        self._keep_client = self._head.keep_alive and self._body_read and not self._draining
        commands.append(SendClient(head.serialize(keep_alive=self._keep_client)))
        return commands

    def _response_complete(self) -> list[Command]:
        assert self._response is not None
        self.wants_upstream = False
        commands: list[Command] = [Disarm(SERVER)]
        if not (self._response.keep_alive and self._body_read and not self._body_stopped):
            commands.append(CloseUpstream())
        commands.append(self._log(Outcome.OK))
        self._served += 1
        if not self._keep_client or self._draining:
            self._phase = _Phase.DONE
            return commands + [Close(linger=not self._body_read)]
        self._next_request()
        self.wants_client = True
        waiting = self._requests.between_messages and not self._pending
        commands.append(Arm(HTTP_KEEP_ALIVE if waiting else HTTP_REQUEST))
        return commands + self._advance()

    def _upstream_error(self, error: UpstreamError) -> list[Command]:
        if error.sending and self._response is None:
            # The upstream stopped taking the body; what it answered (if anything) may still be read.
            self._send_failure = error.reason
            self._body_stopped = True
            self.wants_client = False
            return [Disarm(CLIENT), Arm(SERVER)]
        return self._upstream_failed(f"upstream {self._target} failed: {error.reason}")

    def _upstream_failed(self, reason: str) -> list[Command]:
        self.wants_upstream = False
        if self._send_failure:
            reason = f"upstream {self._target} failed while receiving the request: {self._send_failure}"
        if self._response is not None:  # the head is out: all that is left is to cut the response short
            return [CloseUpstream(), self._log(Outcome.UPSTREAM_ERROR, reason), Close(abort=True)]
        # The Ziti SDK connects us to its bridge before the overlay dial is done; a dial failing
        # then looks like an upstream that closes before its first byte (see ziti.py).
        ziti_dial = self._route.startswith("ziti:") and not self._response_seen
        outcome = Outcome.ZITI_DIAL_FAILED if ziti_dial else Outcome.RESPONSE_FAILED
        return [CloseUpstream(), *self._refuse(502, reason, outcome)]

    # ------------------------------------------------------------------------- timers, the client leaving, drain

    def _timer_fired(self, name: str) -> list[Command]:
        if name == HTTP_KEEP_ALIVE:
            self._phase = _Phase.DONE
            return [Close()]
        if name == CLIENT and self._phase is _Phase.IDLE:
            # The client stopped reading the end of the last response (the driver logs that entry).
            self._phase = _Phase.DONE
            return [Close(abort=True)]
        if name == HTTP_REQUEST:
            if self._served == 0 and self._requests.between_messages:
                return self._end(Outcome.REQUEST_TIMEOUT, "no request within the http-request timeout")
            return self._refuse(408, "no complete request head within the http-request timeout",
                                Outcome.REQUEST_TIMEOUT)
        if name == CLIENT and self._response is None and not self._body_read:
            return [CloseUpstream(), *self._refuse(408, "the client sent no more of its request body within the "
                                                   "client timeout", Outcome.CLIENT_TIMEOUT)]
        if name == CLIENT:
            return [CloseUpstream(), self._log(Outcome.CLIENT_TIMEOUT, "the client stopped reading the response "
                                               "(client timeout)"), Close(abort=True)]
        if self._response is None:
            waited = "response" if self._body_read else "upstream to read the request body"
            outcome = Outcome.RESPONSE_TIMEOUT if self._body_read else Outcome.SERVER_TIMEOUT
            return [CloseUpstream(), *self._refuse(504, f"no {waited} from {self._target} within the server timeout",
                                                   outcome)]
        return [CloseUpstream(), self._log(Outcome.SERVER_TIMEOUT, "the upstream sent no more of its response "
                                           "within the server timeout"), Close(abort=True)]

    def _client_gone(self, outcome: Outcome, reason: str) -> list[Command]:
        if self._phase is _Phase.IDLE and self._requests.between_messages and not self._pending:
            if self._served:  # a kept-alive connection ending between requests: nothing to log
                self._phase = _Phase.DONE
                return [Close()]
            return self._end(outcome, f"{reason} before sending a request")
        commands: list[Command] = []
        if self._phase is _Phase.FORWARDING:
                commands.append(CloseUpstream())
        where = "its request" if self._response is None else "the response"
        return commands + self._end(outcome, f"{reason} in the middle of {where}")

    def _drain(self) -> list[Command]:
        self._draining = True
        if self._phase is _Phase.IDLE and self._requests.between_messages and not self._pending:
            if self._served:
                self._phase = _Phase.DONE
                return [Close()]
            return self._end(Outcome.CANCELLED, "zep is draining")
        return []

    def _cancel(self) -> list[Command]:
        """zep stops now: what to log for the request in hand, if any."""
        if self._phase is _Phase.IDLE and self._served and self._requests.between_messages:
            return []
        return [self._log(Outcome.CANCELLED, "zep stopped")]

    # ------------------------------------------------------------------------- endings

    def _refuse(self, status: int, reason: str, outcome: Outcome,
                headers: Sequence[tuple[str, str]] = ()) -> list[Command]:
        """Answer with an error status and close; the client may still be sending, so linger."""
        self._phase = _Phase.DONE
        self.wants_client = self.wants_upstream = False
        response = httpproxy.error_response(status, headers=headers, body=f"zep: {reason}\n")
        return [SendClient(response), self._log(outcome, reason, status), Close(linger=not self._body_read)]

    def _end(self, outcome: Outcome, reason: str) -> list[Command]:
        self._phase = _Phase.DONE
        self.wants_client = self.wants_upstream = False
        return [self._log(outcome, reason), Close()]

    def _log(self, outcome: Outcome, detail: str = "", status: int = 0) -> Log:
        if not status and self._response is not None:
            status = self._response.status
        return Log(Report(outcome, self._target, self._route, self._user, detail, self._method, self._path, status))

    def _next_request(self) -> None:
        self._phase = _Phase.IDLE
        self._head = self._response = None
        self._target, self._route, self._method, self._path = "-", "-", "", ""
        self._body_read = self._body_stopped = False
        self._send_failure = ""
