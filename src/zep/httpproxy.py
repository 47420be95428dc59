"""Sans-IO HTTP/1.x proxy messages on httptools (llhttp).

`RequestReader` turns client bytes into events: a `RequestHead` (absolute-form
rewritten to origin-form, hop-by-hop and `Proxy-*` headers removed), the de-chunked
body as `BodyChunk`s, then `MessageEnd`; or one `BadMessage` after which the reader
is finished. `ResponseReader` does the same for one upstream exchange. Bodies are
re-framed on the way out with `encode_body` / `end_of_body`, using the `chunked` flag
of the head being forwarded.

Choices the glue relies on:
- Message framing is never forwarded as a header: `headers` holds neither
  Content-Length nor Transfer-Encoding; `serialize()` writes them from
  `chunked` / `content_length`. Chunked trailers are read and dropped.
- A response body delimited by the upstream closing (no length, not chunked) is sent
  on as it is, with `Connection: close` (`ResponseHead.close_delimited`): the glue
  writes the raw bytes (`encode_body(data, False)`) and closes the client afterwards.
  This works for HTTP/1.0 clients too, which chunking would not.
- Requests go upstream with the client's HTTP version, so an HTTP/1.0 client never
  gets a chunked response it cannot read.
- `Upgrade` is always removed and never forwarded: clients reach WebSockets through a
  proxy with CONNECT. A request that asked for an upgrade is forwarded as a plain
  request, and the connection stays HTTP.
- After a message the client (or upstream) marked `Connection: close`, after a
  tunnel (CONNECT), after a `BadMessage` and after the final response, the reader
  stops parsing: later bytes are ignored (after CONNECT they are kept for
  `take_leftover`).
- Head size is limited per message (request line/status line and headers, and
  chunked trailers): 431 for requests, 502 for responses.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import SimpleNamespace

import httptools
from httptools import HttpParserError, HttpParserInvalidMethodError, HttpParserUpgrade

from zep.text import printable, request_target

Headers = tuple[tuple[bytes, bytes], ...]

# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus the framing
# headers, which are rewritten from the parsed framing instead of being copied.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_REG_NAME = re.compile(rb"[A-Za-z0-9._~-]+")
# RFC 9110 7.2 / RFC 3986 3.2.2: uri-host [":" port], the host a reg-name or a bracketed IP literal.
_HOST_HEADER = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")


@dataclass(frozen=True)
class RequestHead:
    method: str
    host: str  # IPv6 without brackets
    port: int
    target: bytes  # origin-form (b"/path?q"); b"" for CONNECT
    version: str  # "1.1" or "1.0"
    headers: Headers  # end-to-end only; Host first, taken from the request target
    proxy_authorization: bytes | None
    keep_alive: bool  # the client wants the connection kept after this exchange
    chunked: bool
    content_length: int | None

    def serialize(self, keep_alive: bool | None = None) -> bytes:
        """The origin-form head for upstream (not meaningful for CONNECT).

        `keep_alive` (default: what the client asked) sets the Connection header the
        upstream sees; HTTP/1.1 needs none to stay open.
        """
        if keep_alive is None:
            keep_alive = self.keep_alive
        lines = [b"%s %s HTTP/%s\r\n" % (self.method.encode("ascii"), self.target, self.version.encode("ascii"))]
        lines.extend(name + b": " + value + b"\r\n" for name, value in self.headers)
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif self.content_length is not None:
            lines.append(b"Content-Length: %d\r\n" % self.content_length)
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: Headers  # end-to-end only
    chunked: bool  # the body that follows is chunked (False whenever there is no body)
    content_length: int | None  # as sent; kept for HEAD and 304, which carry no body
    keep_alive: bool  # the upstream connection can carry another request
    close_delimited: bool = False  # the body ends when the upstream closes

    def serialize(self, keep_alive: bool) -> bytes:
        """The head for the client. Interim (1xx) heads carry no framing or Connection header."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason)]
        lines.extend(name + b": " + value + b"\r\n" for name, value in self.headers)
        if self.status >= 200:
            if self.chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            elif self.content_length is not None:
                lines.append(b"Content-Length: %d\r\n" % self.content_length)
            keep = keep_alive and not self.close_delimited
            lines.append(b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


@dataclass(frozen=True)
class BodyChunk:
    data: bytes  # de-chunked body bytes


@dataclass(frozen=True)
class MessageEnd:
    pass


@dataclass(frozen=True)
class BadMessage:
    status: int  # the HTTP status to answer with
    reason: str  # for the log


RequestEvent = RequestHead | BodyChunk | MessageEnd | BadMessage
ResponseEvent = ResponseHead | BodyChunk | MessageEnd | BadMessage


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp; the outcome is already recorded."""


class _State(enum.Enum):
    IDLE = enum.auto()  # between messages
    HEAD = enum.auto()  # a message has begun, its head is not complete
    BODY = enum.auto()
    DONE = enum.auto()  # parsing has stopped for good


class _Reader:
    """What requests and responses share: callbacks, head limits, stopping."""

    _head_too_large_status: int
    _what: str  # "request" or "response", for log lines

    def __init__(self, parser_type: type, max_head_bytes: int) -> None:
        self._parser_type = parser_type
        self._parser = self._new_parser()
        self._max_head = max_head_bytes
        self._state = _State.IDLE
        self._events: list = []
        self._start_line: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        # httptools buffers a header name or value internally until it is complete, so
        # head bytes are also counted by whole feeds that made no progress past a head
        # or trailer section; that bounds memory even for a header that never ends.
        self._in_meta = False
        self._progress = 0
        self._meta_fed = 0

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_url=self._on_head_bytes,
            on_status=self._on_head_bytes,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_chunk_header=self._on_chunk_header,
            on_chunk_complete=self._on_progress,
            on_message_complete=self._on_message_complete,
        )
        parser = self._parser_type(callbacks)
        # We decide ourselves when a connection ends (Proxy-Connection, our own stop),
        # so llhttp must not refuse bytes after a message it thinks ends the connection.
        parser.set_dangerous_leniencies(lenient_keep_alive=True)
        return parser

    def _feed(self, data: bytes) -> list:
        if self._state is _State.DONE:
            self._after_done(data)
            return []
        progress = self._progress
        self._run(data)
        if self._state is not _State.DONE and self._in_meta and self._progress == progress:
            self._meta_fed += len(data)
            if self._meta_fed > self._max_head:
                self._fail(self._head_too_large_status, f"{self._what} head larger than {self._max_head} bytes")
        events, self._events = self._events, []
        return events

    def _run(self, data: bytes) -> None:
        while True:
            try:
                self._parser.feed_data(data)
                return
            except HttpParserUpgrade as exc:
                rest = self._on_upgrade(data[exc.args[0] :])
                if rest is None:
                    return
                data = rest
            except HttpParserError as exc:
                if self._state is not _State.DONE:  # else it was our own _Stop
                    self._fail(self._parse_error_status(exc), f"malformed {self._what}: {exc}")
                return

    def _fail(self, status: int, reason: str) -> None:
        self._events.append(BadMessage(status, reason))
        self._state = _State.DONE

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._max_head:
            self._fail(self._head_too_large_status, f"{self._what} head larger than {self._max_head} bytes")
            raise _Stop

    # llhttp callbacks

    def _on_message_begin(self) -> None:
        self._state = _State.HEAD
        self._start_line = []
        self._headers = []
        self._head_size = 0
        self._meta_fed = 0
        self._in_meta = True
        self._progress += 1

    def _on_head_bytes(self, part: bytes) -> None:
        self._start_line.append(part)
        self._grow_head(len(part))

    def _on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        if self._state is _State.HEAD:  # else a chunked trailer: counted, then dropped
            self._headers.append((name, value))

    def _on_headers_complete(self) -> None:
        self._on_progress()
        self._state = _State.BODY
        self._head_complete()

    def _on_body(self, data: bytes) -> None:
        self._on_progress()
        if data:
            self._events.append(BodyChunk(data))

    def _on_chunk_header(self) -> None:
        # Either a chunk's data follows, or (after the last chunk) the trailers.
        self._in_meta = True
        self._progress += 1

    def _on_progress(self) -> None:
        self._in_meta = False
        self._progress += 1

    def _on_message_complete(self) -> None:
        self._on_progress()
        self._message_complete()

    # what requests and responses do differently

    def _head_complete(self) -> None:
        raise NotImplementedError

    def _message_complete(self) -> None:
        raise NotImplementedError

    def _on_upgrade(self, rest: bytes) -> bytes | None:
        """Bytes after a message llhttp treats as a protocol switch; returns what to parse next."""
        raise NotImplementedError

    def _after_done(self, data: bytes) -> None:
        """Bytes fed after parsing stopped are ignored, unless a subclass keeps them."""

    def _parse_error_status(self, exc: HttpParserError) -> int:
        raise NotImplementedError


class RequestReader(_Reader):
    """Client bytes -> request events, request after request on one connection."""

    _head_too_large_status = 431
    _what = "request"

    def __init__(self, max_head_bytes: int = 65536) -> None:
        super().__init__(httptools.HttpRequestParser, max_head_bytes)
        self._tunnel = False
        self._keep_alive = True
        self._upgrade_body: bytes | None = None  # framing of an upgrade request's body
        self._leftover = b""
        self._first_byte_seen = False
        self._chunk = b""  # the bytes being fed
        self._window = b""  # earlier feeds of a head that is not complete yet

    @property
    def between_messages(self) -> bool:
        """No part of a next request has been fed yet."""
        return self._state is _State.IDLE

    def feed(self, data: bytes) -> list[RequestEvent]:
        if data and not self._first_byte_seen:
            self._first_byte_seen = True
            wrong = wrong_protocol(data[0])
            if wrong is not None:
                self._fail(400, wrong)
                events, self._events = self._events, []
                return events
        self._chunk = data
        events = self._feed(data)
        # A head still incomplete may have begun anywhere in this feed: keep it for the start-line check.
        self._window = self._window + data if self._state is _State.HEAD else b""
        return events

    def take_leftover(self) -> bytes:
        """After a CONNECT head: the bytes that followed it (the tunnel's first bytes)."""
        leftover, self._leftover = self._leftover, b""
        return leftover

    def _head_complete(self) -> None:
        if self._upgrade_body is not None:
            self._upgrade_body = None  # the primer head from _on_upgrade: not a request
            return
        method = self._parser.get_method().decode("ascii")
        version = self._parser.get_http_version()
        target = b"".join(self._start_line)
        # llhttp lets runs of spaces through in the request line; RFC 9112 3 says single spaces.
        line = b"%s %s HTTP/%s\r" % (method.encode("ascii"), target, version.encode("ascii"))
        if line not in self._window + self._chunk and line[:-1] + b"\n" not in self._window + self._chunk:
            self._fail(400, "malformed request line (more than one space between its parts)")
            raise _Stop
        head = _request_head(method, version, target, self._headers)
        if isinstance(head, BadMessage):
            self._fail(head.status, head.reason)
            raise _Stop
        self._tunnel = method == "CONNECT"
        self._keep_alive = head.keep_alive
        if self._parser.should_upgrade() and not self._tunnel:
            # llhttp leaves the body of an upgrade request unparsed; note its framing.
            if head.chunked:
                self._upgrade_body = b"Transfer-Encoding: chunked"
            elif head.content_length:
                self._upgrade_body = b"Content-Length: %d" % head.content_length
        self._events.append(head)

    def _message_complete(self) -> None:
        if self._tunnel or self._upgrade_body is not None:
            return  # llhttp pauses right after this and tells us where it stopped
        self._events.append(MessageEnd())
        if not self._keep_alive:
            self._state = _State.DONE
            raise _Stop
        self._state = _State.IDLE

    def _on_upgrade(self, rest: bytes) -> bytes | None:
        if self._tunnel:
            self._events.append(MessageEnd())
            self._leftover = rest
            self._state = _State.DONE
            return None
        if self._upgrade_body is not None:
            # We forward it as a plain request (Upgrade removed), so its body must be parsed:
            # prime a fresh parser with the same framing and let it read on from here.
            self._parser = self._new_parser()
            self._parser.feed_data(b"POST / HTTP/1.1\r\n" + self._upgrade_body + b"\r\n\r\n")
        return rest

    def _after_done(self, data: bytes) -> None:
        if self._tunnel:
            self._leftover += data

    def _parse_error_status(self, exc: HttpParserError) -> int:
        if isinstance(exc, HttpParserInvalidMethodError):
            return 501
        return 505 if "HTTP version" in str(exc) else 400


class ResponseReader(_Reader):
    """Upstream bytes -> events for the response(s) to one request: any 1xx, then the final one."""

    _head_too_large_status = 502
    _what = "response"

    def __init__(self, request_method: str, max_head_bytes: int = 65536) -> None:
        super().__init__(httptools.HttpResponseParser, max_head_bytes)
        self._request_method = request_method.upper()
        self._head: ResponseHead | None = None
        self._started = False
        self.final = False

    def feed(self, data: bytes) -> list[ResponseEvent]:
        if data:
            self._started = True
        return self._feed(data)

    def feed_eof(self) -> list[ResponseEvent]:
        """The upstream closed: this ends a close-delimited body, anything else is cut short."""
        if self._state is _State.DONE:
            return []
        if self._state is _State.BODY and self._head is not None and self._head.close_delimited:
            self._events.append(MessageEnd())
            self.final = True
            self._state = _State.DONE
        elif not self._started:
            self._fail(502, "upstream closed the connection without responding")
        else:
            self._fail(502, "upstream closed the connection before the response was complete")
        events, self._events = self._events, []
        return events

    def _head_complete(self) -> None:
        head = _response_head(
            self._request_method,
            self._parser.get_status_code(),
            b"".join(self._start_line),
            self._parser.get_http_version(),
            self._headers,
        )
        if isinstance(head, BadMessage):
            self._fail(head.status, head.reason)
            raise _Stop
        self._head = head
        self._events.append(head)
        if self._request_method == "HEAD" and head.status >= 200:
            # llhttp cannot be told a response answers HEAD, so end the exchange here.
            self._events.append(MessageEnd())
            self._finish()

    def _message_complete(self) -> None:
        self._events.append(MessageEnd())
        assert self._head is not None  # headers always complete before the message does
        if self._head.status < 200:
            self._state = _State.IDLE  # an interim response: the real one follows
        else:
            self._finish()

    def _finish(self) -> None:
        # Anything after the final response is not ours to parse; stop llhttp here.
        self.final = True
        self._state = _State.DONE
        raise _Stop

    def _on_upgrade(self, rest: bytes) -> bytes | None:
        self._fail(502, "upstream switched protocols")
        return None

    def _parse_error_status(self, exc: HttpParserError) -> int:
        return 502


def wrong_protocol(first: int) -> str | None:
    """What a connection that opens with `first` speaks, when it is plainly not HTTP."""
    if first in (0x04, 0x05):
        return (f"a SOCKS{first} client on the HTTP proxy port: use an http:// proxy URL for this port, "
                "or socks5h:// with the SOCKS5 port")
    if first == 0x16:
        return ("a TLS handshake on the HTTP proxy port: the client was given an https:// proxy URL; "
                "use http:// (HTTPS destinations still work, through CONNECT)")
    return None


def _request_head(
    method: str, version: str, target: bytes, raw_headers: list[tuple[bytes, bytes]]
) -> RequestHead | BadMessage:
    if version not in ("1.0", "1.1"):
        return BadMessage(505, f"HTTP/{version} is not supported")
    if method == "CONNECT":
        address = _parse_authority(target)
        if address is None:
            return BadMessage(400, f"CONNECT target \"{printable(target)}\" is not host:port")
        host, port = address
        authority, origin_target = target, b""
    else:
        try:
            url = httptools.parse_url(target)
        except HttpParserError:
            return BadMessage(400, f"invalid request target \"{request_target(target)}\"")
        if url.schema is None:
            return BadMessage(400, f"request target \"{request_target(target)}\" is not an absolute URL (a proxy needs one)")
        if url.schema.lower() != b"http":
            return BadMessage(501, f"scheme \"{printable(url.schema)}\" is not supported (use CONNECT)")
        if b"@" in target.partition(b"://")[2].partition(b"/")[0].partition(b"?")[0]:
            # RFC 9110 4.2.4: an http URL carries no user information (often a password); never logged.
            return BadMessage(400, "request target carries user information")
        if not url.host or url.port == 0:
            return BadMessage(400, f"request target \"{request_target(target)}\" names no host and port")
        host, port = url.host.decode("latin-1"), url.port or 80
        authority = (b"[%s]" % url.host if b":" in url.host else url.host) + (
            b":%d" % url.port if url.port is not None else b""
        )
        origin_target = _origin_form(target)

    framing = _framing(raw_headers, 501)
    if isinstance(framing, BadMessage):
        return framing
    chunked, content_length = framing
    if chunked and version == "1.0":
        return BadMessage(400, "chunked body in an HTTP/1.0 request")
    if method == "CONNECT" and (chunked or content_length):
        return BadMessage(400, "CONNECT request with a body")
    hosts = _values(raw_headers, b"host")
    # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without exactly one valid Host.
    if len(hosts) > 1:
        return BadMessage(400, "more than one Host header")
    if not hosts and version == "1.1":
        return BadMessage(400, "HTTP/1.1 request without a Host header")
    if hosts and not _HOST_HEADER.fullmatch(hosts[0]):
        return BadMessage(400, "invalid Host header")
    # RFC 9112 3.2.2: the target's authority wins over any Host header the client sent.
    headers = ((b"Host", authority),) + _end_to_end(raw_headers, drop=b"host")
    proxy_authorization = next(iter(_values(raw_headers, b"proxy-authorization")), None)
    return RequestHead(
        method=method,
        host=host,
        port=port,
        target=origin_target,
        version=version,
        headers=headers,
        proxy_authorization=proxy_authorization,
        keep_alive=_keep_alive(version, _tokens(raw_headers, b"connection", b"proxy-connection")),
        chunked=chunked,
        content_length=content_length,
    )


def _response_head(
    request_method: str, status: int, reason: bytes, version: str, raw_headers: list[tuple[bytes, bytes]]
) -> ResponseHead | BadMessage:
    if version not in ("1.0", "1.1"):
        return BadMessage(502, f"upstream answered with HTTP/{version}")
    if not 100 <= status <= 999:
        return BadMessage(502, f"upstream sent status {status}")
    if status == 101:
        return BadMessage(502, "upstream switched protocols, which was never asked for")
    framing = _framing(raw_headers, 502)
    if isinstance(framing, BadMessage):
        return framing
    chunked, content_length = framing
    if status < 200 and (chunked or content_length):
        return BadMessage(502, f"upstream sent a body with interim status {status}")
    no_body = request_method == "HEAD" or status < 200 or status in (204, 304)
    close_delimited = not no_body and not chunked and content_length is None
    return ResponseHead(
        status=status,
        reason=reason,
        version=version,
        headers=_end_to_end(raw_headers),
        chunked=chunked and not no_body,
        content_length=content_length,
        keep_alive=_keep_alive(version, _tokens(raw_headers, b"connection")) and not close_delimited,
        close_delimited=close_delimited,
    )


def _parse_authority(authority: bytes) -> tuple[str, int] | None:
    """CONNECT's `host:port` (IPv6 in brackets) -> (host, port), or None."""
    host, colon, port = authority.rpartition(b":")
    if not colon or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        return None
    if host.startswith(b"[") and host.endswith(b"]"):
        literal = host[1:-1].decode("ascii", "replace")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        return literal, int(port)  # as sent, like hosts in absolute URLs
    if not _REG_NAME.fullmatch(host):
        return None
    return host.decode("ascii"), int(port)


def _origin_form(absolute: bytes) -> bytes:
    """The path and query of an absolute URL exactly as sent (no fragment); "/" if empty."""
    rest = absolute.partition(b"://")[2]
    ends = [i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0]
    path = rest[min(ends, default=len(rest)) :].partition(b"#")[0]
    return path if path.startswith(b"/") else b"/" + path


def _framing(headers: list[tuple[bytes, bytes]], unsupported_status: int) -> tuple[bool, int | None] | BadMessage:
    """(chunked, content_length). llhttp has already refused both together and duplicate lengths."""
    codings = [coding.strip().lower() for value in _values(headers, b"transfer-encoding") for coding in value.split(b",")]
    if codings and codings != [b"chunked"]:
        # Only plain chunked can be re-framed faithfully; anything else is refused.
        return BadMessage(unsupported_status, f"transfer coding \"{printable(b', '.join(codings))}\" is not supported")
    lengths = _values(headers, b"content-length")
    return bool(codings), int(lengths[0]) if lengths else None


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _tokens(headers: Iterable[tuple[bytes, bytes]], *names: bytes) -> frozenset[bytes]:
    """Lower-cased comma-separated tokens of the named headers (Connection and the like)."""
    return frozenset(
        token.strip().lower()
        for key, value in headers
        if key.lower() in names
        for token in value.split(b",")
    )


def _keep_alive(version: str, connection_tokens: frozenset[bytes]) -> bool:
    if b"close" in connection_tokens:
        return False
    return version == "1.1" or b"keep-alive" in connection_tokens


def _end_to_end(headers: list[tuple[bytes, bytes]], drop: bytes = b"") -> Headers:
    """Headers without hop-by-hop ones, the ones Connection names, and every Proxy-* header."""
    named = _tokens(headers, b"connection")
    kept = []
    for name, value in headers:
        key = name.lower()
        if key in _HOP_BY_HOP or key in named or key == drop or key.startswith(b"proxy-"):
            continue
        kept.append((name, value))
    return tuple(kept)


def encode_body(chunk: bytes, chunked: bool) -> bytes:
    """Body bytes framed for the wire; an empty chunk is b"" (never the last-chunk marker)."""
    if not chunk:
        return b""
    if chunked:
        return b"%x\r\n%s\r\n" % (len(chunk), chunk)
    return chunk


def end_of_body(chunked: bool) -> bytes:
    return b"0\r\n\r\n" if chunked else b""


def error_response(
    status: int,
    reason: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: str | None = None,
) -> bytes:
    """A complete response that ends the connection (the caller closes after writing it)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    if reason is not None:
        # The reason may come from a log line: keep the status line one printable line.
        phrase = "".join(char if char.isprintable() else " " for char in reason)
    if body is None:
        body = f"{status} {phrase}\n"
    payload = body.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii", "replace")]
    lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    lines.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    lines.append(b"Content-Length: %d\r\n" % len(payload))
    lines.append(b"Connection: close\r\n\r\n")
    return b"".join(lines) + payload
