import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zep.httpproxy import (
    BadMessage,
    BodyChunk,
    MessageEnd,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    encode_body,
    end_of_body,
    error_response,
)


def normalize(events):
    """Join adjacent body chunks: how a body is cut depends on how the bytes arrived."""
    out = []
    for event in events:
        if isinstance(event, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def feed(reader, data: bytes, splits=()):
    cuts = [0, *sorted(splits), len(data)]
    events = []
    for start, end in zip(cuts, cuts[1:]):
        events += reader.feed(data[start:end])
    return normalize(events)


def parse_request(data: bytes, splits=(), **kwargs):
    return feed(RequestReader(**kwargs), data, splits)


def parse_response(data: bytes, method: str = "GET", eof: bool = False, splits=()):
    reader = ResponseReader(method)
    events = feed(reader, data, splits)
    if eof:
        events = normalize(events + reader.feed_eof())
    return events, reader


def head_of(data: bytes) -> RequestHead:
    events = parse_request(data)
    assert isinstance(events[0], RequestHead), events
    return events[0]


def bad(events) -> BadMessage:
    assert isinstance(events[-1], BadMessage), events
    return events[-1]


# Requests


class TestAbsoluteForm:
    def test_simple_get(self):
        events = parse_request(b"GET http://example.com/a/b?c=d#frag HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n")
        assert events == [
            RequestHead(
                method="GET",
                host="example.com",
                port=80,
                target=b"/a/b?c=d",
                version="1.1",
                headers=((b"Host", b"example.com"), (b"Accept", b"*/*")),
                proxy_authorization=None,
                keep_alive=True,
                chunked=False,
                content_length=None,
            ),
            MessageEnd(),
        ]

    def test_port_and_default_path(self):
        head = head_of(b"GET http://svc.ziti:8080 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (head.host, head.port, head.target) == ("svc.ziti", 8080, b"/")
        assert head.headers[0] == (b"Host", b"svc.ziti:8080")

    def test_ipv6_host(self):
        head = head_of(b"GET http://[::1]:81/x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (head.host, head.port, head.target) == ("::1", 81, b"/x")
        assert head.headers[0] == (b"Host", b"[::1]:81")

    def test_scheme_case_insensitive(self):
        head = head_of(b"GET HTTP://Example.COM/ HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (head.host, head.port) == ("Example.COM", 80)
        assert head.headers == ((b"Host", b"Example.COM"),)

    @pytest.mark.parametrize("url", [b"http://user:pw@a/", b"http://user@a:81/x", b"http://@a/"])
    def test_userinfo_is_refused_and_not_logged(self, url):
        # RFC 9110 4.2.4: an http URL with user information SHOULD be rejected; it often holds a password.
        refused = bad(parse_request(b"GET " + url + b" HTTP/1.1\r\nHost: a\r\n\r\n"))
        assert (refused.status, refused.reason) == (400, "request target carries user information")

    def test_url_authority_wins_over_host_header(self):
        head = head_of(b"GET http://a.example/ HTTP/1.1\r\nX-A: 1\r\nhost: b.example\r\n\r\n")
        assert head.headers == ((b"Host", b"a.example"), (b"X-A", b"1"))

    def test_empty_query_kept(self):
        assert head_of(b"GET http://a/p? HTTP/1.1\r\nHost: h\r\n\r\n").target == b"/p?"

    def test_origin_form_is_not_for_a_proxy(self):
        assert bad(parse_request(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).status == 400

    def test_asterisk_form(self):
        assert bad(parse_request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")).status == 400

    @pytest.mark.parametrize("url", [b"https://a/", b"ftp://a/", b"ws://a/"])
    def test_other_schemes_not_implemented(self, url):
        assert bad(parse_request(b"GET " + url + b" HTTP/1.1\r\nHost: h\r\n\r\n")).status == 501

    @pytest.mark.parametrize("url", [b"http:///x", b"http://a:0/", b"http://a:99999/", b"http://a:/x"])
    def test_no_usable_host_or_port(self, url):
        assert bad(parse_request(b"GET " + url + b" HTTP/1.1\r\nHost: h\r\n\r\n")).status == 400


class TestHeaders:
    def test_hop_by_hop_and_proxy_headers_removed(self):
        head = head_of(
            b"GET http://a/ HTTP/1.1\r\nHost: h\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"X-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n"
            b"Proxy-Foo: bar\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-T\r\n"
            b"Upgrade: h2c\r\n"
            b"Accept: text/html\r\n"
            b"Authorization: Bearer t\r\n"
            b"\r\n"
        )
        assert head.headers == ((b"Host", b"a"), (b"Accept", b"text/html"), (b"Authorization", b"Bearer t"))
        assert head.proxy_authorization == b"Basic dTpw"

    def test_header_case_and_values_preserved(self):
        head = head_of(b"GET http://a/ HTTP/1.1\r\nHost: h\r\nx-MiXeD: Some Value \xff\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n")
        assert head.headers[1:] == ((b"x-MiXeD", b"Some Value \xff"), (b"X-Dup", b"1"), (b"X-Dup", b"2"))

    def test_multiple_host_headers(self):
        assert bad(parse_request(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")).status == 400

    def test_invalid_header_syntax(self):
        assert bad(parse_request(b"GET http://a/ HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n")).status == 400
        assert bad(parse_request(b"GET http://a/ HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n")).status == 400
        assert bad(parse_request(b"GET http://a/ HTTP/1.1\nX: a\n\n")).status == 400

    def test_expect_passes_through(self):
        head = head_of(b"PUT http://a/ HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
        assert (b"Expect", b"100-continue") in head.headers


class TestKeepAlive:
    @pytest.mark.parametrize(
        "version, headers, expected",
        [
            (b"1.1", b"", True),
            (b"1.1", b"Connection: close\r\n", False),
            (b"1.1", b"Connection: Keep-Alive, CLOSE\r\n", False),
            (b"1.1", b"Proxy-Connection: close\r\n", False),
            (b"1.0", b"", False),
            (b"1.0", b"Connection: keep-alive\r\n", True),
            (b"1.0", b"Proxy-Connection: Keep-Alive\r\n", True),
        ],
    )
    def test_keep_alive(self, version, headers, expected):
        assert head_of(b"GET http://a/ HTTP/" + version + b"\r\nHost: a\r\n" + headers + b"\r\n").keep_alive is expected

    def test_reader_stops_after_a_closing_request(self):
        events = parse_request(
            b"GET http://a/1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET http://a/2 HTTP/1.1\r\nHost: h\r\n\r\n", splits=[50]
        )
        assert [type(e) for e in events] == [RequestHead, MessageEnd]

    def test_http10_keep_alive_via_proxy_connection_continues(self):
        events = parse_request(
            b"GET http://a/1 HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\nGET http://a/2 HTTP/1.0\r\n\r\nGARBAGE"
        )
        assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/1", b"/2"]
        assert isinstance(events[-1], MessageEnd)


class TestVersionAndMethod:
    @pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2", b"3.0"])
    def test_unsupported_versions(self, version):
        assert bad(parse_request(b"GET http://a/ HTTP/" + version + b"\r\n\r\n")).status == 505

    def test_unknown_method(self):
        assert bad(parse_request(b"FROB http://a/ HTTP/1.1\r\nHost: h\r\n\r\n")).status == 501

    def test_garbage(self):
        assert bad(parse_request(b"\x16\x03\x01\x02\x00\x01\x00")).status in (400, 501)


class TestBodies:
    def test_content_length(self):
        events = parse_request(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        assert events[0].content_length == 5 and not events[0].chunked
        assert events[1:] == [BodyChunk(b"hello"), MessageEnd()]

    def test_content_length_zero(self):
        events = parse_request(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
        assert events[0].content_length == 0
        assert events[1:] == [MessageEnd()]

    def test_chunked_is_dechunked_and_trailers_dropped(self):
        events = parse_request(
            b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        head = events[0]
        assert head.chunked and head.content_length is None
        assert all(name.lower() not in (b"transfer-encoding", b"x-trailer") for name, _ in head.headers)
        assert events[1:] == [BodyChunk(b"hello world"), MessageEnd()]

    def test_body_not_complete_yet(self):
        reader = RequestReader()
        events = reader.feed(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        assert [type(e) for e in events] == [RequestHead, BodyChunk]
        assert reader.feed(b"defghij") == [BodyChunk(b"defghij"), MessageEnd()]

    def test_pipelined_requests_in_order(self):
        events = parse_request(
            b"POST http://a/1 HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx"
            b"GET http://b/2 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST http://c/3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\ny\r\n0\r\n\r\n"
        )
        summary = [(e.host, e.target) if isinstance(e, RequestHead) else e for e in events]
        assert summary == [
            ("a", b"/1"),
            BodyChunk(b"x"),
            MessageEnd(),
            ("b", b"/2"),
            MessageEnd(),
            ("c", b"/3"),
            BodyChunk(b"y"),
            MessageEnd(),
        ]

    def test_feed_empty(self):
        reader = RequestReader()
        assert reader.feed(b"") == []
        assert reader.feed(b"GET http://a/ HTTP/1.1\r\nHost: h\r\n") == []
        assert reader.feed(b"") == []
        assert [type(e) for e in reader.feed(b"\r\n")] == [RequestHead, MessageEnd]


class TestSmuggling:
    def test_content_length_and_transfer_encoding(self):
        events = parse_request(
            b"POST http://a/ HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        assert events == [bad(events)] and events[0].status == 400

    def test_transfer_encoding_then_content_length(self):
        events = parse_request(
            b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
        )
        assert bad(events).status == 400

    @pytest.mark.parametrize("lengths", [b"Content-Length: 1\r\nContent-Length: 2\r\n", b"Content-Length: 1, 2\r\n"])
    def test_differing_content_lengths(self, lengths):
        assert bad(parse_request(b"POST http://a/ HTTP/1.1\r\nHost: h\r\n" + lengths + b"\r\nab")).status == 400

    @pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"identity"])
    def test_other_transfer_codings(self, coding):
        events = parse_request(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n")
        assert bad(events).status in (400, 501)
        assert not any(isinstance(e, RequestHead) for e in events)

    def test_chunked_in_http10(self):
        assert bad(parse_request(b"POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")).status == 400

    def test_bad_chunk_size(self):
        events = parse_request(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert [type(e) for e in events] == [RequestHead, BadMessage]

    def test_nothing_after_a_bad_message(self):
        reader = RequestReader()
        assert bad(reader.feed(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"))
        assert reader.feed(b"GET http://a/ HTTP/1.1\r\nHost: h\r\n\r\n") == []


class TestConnect:
    def test_connect(self):
        reader = RequestReader()
        events = reader.feed(b"CONNECT svc.ziti:443 HTTP/1.1\r\nHost: svc.ziti:443\r\nProxy-Authorization: x\r\n\r\n")
        head = events[0]
        assert (head.method, head.host, head.port, head.target) == ("CONNECT", "svc.ziti", 443, b"")
        assert head.proxy_authorization == b"x"
        assert events[1:] == [MessageEnd()]
        assert reader.take_leftover() == b""

    def test_early_bytes_become_leftover(self):
        reader = RequestReader()
        events = reader.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: h\r\n\r\n\x16\x03\x01hello GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n")
        assert [type(e) for e in events] == [RequestHead, MessageEnd]
        assert reader.feed(b"more") == []
        assert reader.take_leftover() == b"\x16\x03\x01hello GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\nmore"
        assert reader.take_leftover() == b""

    def test_after_keep_alive_requests(self):
        reader = RequestReader()
        events = reader.feed(b"GET http://a/ HTTP/1.1\r\nHost: h\r\n\r\nCONNECT b:22 HTTP/1.1\r\nHost: h\r\n\r\nSSH-2.0")
        assert [(e.method, e.host) for e in events if isinstance(e, RequestHead)] == [("GET", "a"), ("CONNECT", "b")]
        assert reader.take_leftover() == b"SSH-2.0"

    def test_ipv6(self):
        head = head_of(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (head.host, head.port) == ("2001:db8::1", 8443)
        assert head_of(b"CONNECT [2001:DB8:0::1]:1 HTTP/1.1\r\nHost: h\r\n\r\n").host == "2001:DB8:0::1"

    @pytest.mark.parametrize(
        "target",
        [b"a", b"a:", b"a:0", b"a:65536", b"a:123456", b"a:x", b":443", b"[zz]:443", b"::1:443", b"a/b:443", b"a@b:1"],
    )
    def test_bad_targets(self, target):
        assert bad(parse_request(b"CONNECT " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")).status == 400

    def test_connect_with_a_body(self):
        assert bad(parse_request(b"CONNECT a:1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")).status == 400


class TestUpgrade:
    def test_upgrade_is_not_forwarded_and_the_connection_stays_http(self):
        events = parse_request(
            b"GET http://a/ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n"
            b"GET http://a/next HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        heads = [e for e in events if isinstance(e, RequestHead)]
        assert [h.target for h in heads] == [b"/ws", b"/next"]
        assert heads[0].headers == ((b"Host", b"a"), (b"Sec-WebSocket-Key", b"k"))

    @pytest.mark.parametrize(
        "framing, body",
        [(b"Content-Length: 2", b"hi"), (b"Transfer-Encoding: chunked", b"1\r\nh\r\n1\r\ni\r\n0\r\n\r\n")],
    )
    def test_upgrade_with_body(self, framing, body):
        # curl sends "Upgrade: h2c" on POSTs too; the body is a normal one.
        data = (
            b"POST http://a/ HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n" + framing + b"\r\n\r\n" + body + b"GET http://a/next HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        for cuts in ([], range(len(data))):
            events = parse_request(data, cuts)
            assert [type(e) for e in events] == [RequestHead, BodyChunk, MessageEnd, RequestHead, MessageEnd]
            assert events[0].headers == ((b"Host", b"a"),)
            assert events[1] == BodyChunk(b"hi")

    def test_upgrade_with_body_then_close(self):
        events = parse_request(
            b"POST http://a/ HTTP/1.1\r\nHost: h\r\nUpgrade: x\r\nConnection: upgrade, close\r\nContent-Length: 2\r\n\r\nhi"
            b"GET http://a/next HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        assert [type(e) for e in events] == [RequestHead, BodyChunk, MessageEnd]


class TestHeadLimit:
    def test_large_header_in_one_feed(self):
        events = parse_request(b"GET http://a/ HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 2000 + b"\r\n\r\n", max_head_bytes=1024)
        assert events == [bad(events)] and events[0].status == 431

    def test_large_url(self):
        events = parse_request(b"GET http://a/" + b"p" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", max_head_bytes=1024)
        assert bad(events).status == 431

    def test_many_headers(self):
        headers = b"".join(b"H%d: v\r\n" % i for i in range(500))
        assert bad(parse_request(b"GET http://a/ HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n", max_head_bytes=1024)).status == 431

    def test_header_that_never_ends(self):
        # httptools holds an unfinished header value itself; the reader must still cap it.
        reader = RequestReader(max_head_bytes=4096)
        assert reader.feed(b"GET http://a/ HTTP/1.1\r\nHost: h\r\nX: ") == []
        events = []
        for _ in range(10):
            events += reader.feed(b"v" * 1000)
        assert bad(events).status == 431
        assert len(events) == 1

    def test_limit_is_per_message(self):
        one = b"GET http://a/ HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 600 + b"\r\n\r\n"
        events = parse_request(one * 5, max_head_bytes=1024)
        assert [type(e) for e in events] == [RequestHead, MessageEnd] * 5

    def test_large_bodies_do_not_count(self):
        body = b"b" * 10000
        chunk = b"%x\r\n%s\r\n" % (len(body), body)
        data = (
            b"POST http://a/ HTTP/1.1\r\nHost: h\r\nContent-Length: 10000\r\n\r\n" + body
            + b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 4 + b"0\r\n\r\n"
        )
        # Cut right after every chunk-size line and inside the chunks.
        splits = [i + 6 for i in range(len(data)) if data.startswith(b"2710\r\n", i)]
        splits += [s + 5000 for s in splits]
        for cuts in ([], splits, range(0, len(data), 700)):
            events = parse_request(data, cuts, max_head_bytes=1024)
            assert [type(e) for e in events] == [RequestHead, BodyChunk, MessageEnd] * 2

    def test_trailers_that_never_end(self):
        reader = RequestReader(max_head_bytes=2048)
        events = reader.feed(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: ")
        for _ in range(10):
            events += reader.feed(b"t" * 1000)
        assert [type(e) for e in events] == [RequestHead, BodyChunk, BadMessage]
        assert events[-1].status == 431


class TestRequestSerialize:
    def test_get(self):
        head = head_of(b"GET http://a:8080/x?y HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nConnection: close\r\n\r\n")
        assert head.serialize() == b"GET /x?y HTTP/1.1\r\nHost: a:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        assert head.serialize(keep_alive=True) == b"GET /x?y HTTP/1.1\r\nHost: a:8080\r\nAccept: */*\r\n\r\n"

    def test_framing(self):
        head = head_of(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        assert head.serialize() == b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
        head = head_of(b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert head.serialize() == b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"

    def test_http10_keeps_its_version(self):
        head = head_of(b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert head.serialize() == b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
        assert head.serialize(keep_alive=False) == b"GET / HTTP/1.0\r\nHost: a\r\nConnection: close\r\n\r\n"

    def test_serialized_head_parses_back(self):
        head = head_of(b"PUT http://[::1]:9/p HTTP/1.1\r\nHost: h\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        reparsed = head_of(head.serialize().replace(b"PUT /p", b"PUT http://[::1]:9/p"))
        assert reparsed == head


# Responses


class TestResponses:
    def test_content_length(self):
        events, reader = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")
        assert events == [
            ResponseHead(200, b"OK", "1.1", ((b"X-A", b"b"),), False, 5, True, False),
            BodyChunk(b"hello"),
            MessageEnd(),
        ]
        assert reader.final

    def test_not_final_until_complete(self):
        reader = ResponseReader("GET")
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
        assert not reader.final
        assert reader.feed(b"lo") == [BodyChunk(b"lo"), MessageEnd()]
        assert reader.final

    def test_chunked(self):
        events, _ = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
        )
        assert events[0].chunked and events[0].headers == ()
        assert events[1:] == [BodyChunk(b"abc"), MessageEnd()]

    def test_close_delimited(self):
        reader = ResponseReader("GET")
        events = reader.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
        events += reader.feed(b" body")
        assert not reader.final
        events += reader.feed_eof()
        head = events[0]
        assert head.close_delimited and not head.keep_alive and not head.chunked and head.content_length is None
        assert normalize(events[1:]) == [BodyChunk(b"some body"), MessageEnd()]
        assert reader.final
        assert reader.feed_eof() == []

    def test_head_response_has_no_body(self):
        events, reader = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method="HEAD")
        assert [type(e) for e in events] == [ResponseHead, MessageEnd]
        assert events[0].content_length == 1234 and not events[0].close_delimited
        assert reader.final

    def test_head_response_chunked_or_unframed(self):
        for headers in (b"Transfer-Encoding: chunked\r\n", b""):
            events, reader = parse_response(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n", method="head")
            assert [type(e) for e in events] == [ResponseHead, MessageEnd]
            assert not events[0].chunked and not events[0].close_delimited and events[0].keep_alive

    @pytest.mark.parametrize("status", [204, 304])
    def test_no_body_statuses(self, status):
        events, reader = parse_response(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
        assert [type(e) for e in events] == [ResponseHead, MessageEnd]
        assert reader.final

    def test_interim_then_final(self):
        events, reader = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )
        assert [(e.status, e.headers) if isinstance(e, ResponseHead) else e for e in events] == [
            (100, ()),
            MessageEnd(),
            (103, ((b"Link", b"</s.css>; rel=preload"),)),
            MessageEnd(),
            (201, ()),
            BodyChunk(b"ok"),
            MessageEnd(),
        ]
        assert reader.final

    def test_interim_alone_is_not_final(self):
        reader = ResponseReader("POST")
        assert [type(e) for e in reader.feed(b"HTTP/1.1 100 Continue\r\n\r\n")] == [ResponseHead, MessageEnd]
        assert not reader.final
        assert bad(reader.feed_eof()).status == 502

    def test_interim_head_to_head_request(self):
        events, reader = parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD")
        assert [type(e) for e in events] == [ResponseHead, MessageEnd, ResponseHead, MessageEnd]
        assert reader.final

    def test_bytes_after_the_final_response_are_ignored(self):
        for tail in (b"HTTP/1.1 200 OK\r\n\r\n", b"garbage", b"\r\n"):
            for head in (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"):
                events, reader = parse_response(head + tail)
                assert [type(e) for e in events] == [ResponseHead, BodyChunk, MessageEnd]
                assert reader.feed(b"more") == [] and reader.feed_eof() == []
        events, _ = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnot a body", "HEAD")
        assert [type(e) for e in events] == [ResponseHead, MessageEnd]

    def test_hop_by_hop_removed(self):
        events, _ = parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\nTrailer: X\r\nSet-Cookie: a=b\r\nContent-Length: 0\r\n\r\n"
        )
        assert events[0].headers == ((b"Set-Cookie", b"a=b"),)

    @pytest.mark.parametrize(
        "head, keep_alive",
        [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", True),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n", False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n", False),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n", True),
        ],
    )
    def test_keep_alive(self, head, keep_alive):
        events, _ = parse_response(head + b"\r\n")
        assert events[0].keep_alive is keep_alive
        assert events[0].version == head[5:8].decode()

    def test_empty_reason(self):
        events, _ = parse_response(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
        assert events[0].reason == b""


class TestBadResponses:
    @pytest.mark.parametrize(
        "data",
        [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 199 Odd\r\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnope\r\n",
        ],
    )
    def test_malformed_is_502(self, data):
        events, _ = parse_response(data)
        assert bad(events).status == 502

    def test_eof_without_response(self):
        assert bad(ResponseReader("GET").feed_eof()).reason.startswith("upstream closed the connection without")

    @pytest.mark.parametrize(
        "data",
        [
            b"HTTP/1.1 200 OK\r\nContent-Len",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ],
    )
    def test_eof_mid_message(self, data):
        events, reader = parse_response(data, eof=True)
        assert bad(events).status == 502
        assert not reader.final

    def test_head_too_large(self):
        reader = ResponseReader("GET", max_head_bytes=1024)
        events = reader.feed(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 2000 + b"\r\n\r\n")
        assert bad(events).status == 502


class TestResponseSerialize:
    def head(self, data: bytes, method: str = "GET") -> ResponseHead:
        events, _ = parse_response(data, method)
        return events[0]

    def test_content_length(self):
        head = self.head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\n")
        assert head.serialize(True) == b"HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
        assert head.serialize(False) == b"HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"

    def test_chunked(self):
        head = self.head(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert head.serialize(True) == b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"

    def test_close_delimited_always_closes(self):
        head = self.head(b"HTTP/1.0 200 OK\r\n\r\n")
        assert head.serialize(True) == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"

    def test_head_response_keeps_its_length(self):
        head = self.head(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD")
        assert head.serialize(True) == b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nConnection: keep-alive\r\n\r\n"

    def test_interim(self):
        head = self.head(b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n")
        assert head.serialize(False) == b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n"

    def test_round_trip(self):
        raw = b"HTTP/1.1 200 OK\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        head = self.head(raw)
        assert self.head(head.serialize(True)) == head


class TestHelpers:
    def test_encode_body(self):
        assert encode_body(b"hello", True) == b"5\r\nhello\r\n"
        assert encode_body(b"x" * 255, True) == b"ff\r\n" + b"x" * 255 + b"\r\n"
        assert encode_body(b"hello", False) == b"hello"
        assert encode_body(b"", True) == b"" and encode_body(b"", False) == b""

    def test_end_of_body(self):
        assert end_of_body(True) == b"0\r\n\r\n"
        assert end_of_body(False) == b""

    def test_rechunked_body_parses_back(self):
        body = [b"a", b"bc" * 100, b"", b"\r\n0\r\n\r\n"]
        wire = b"POST http://a/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire += b"".join(encode_body(c, True) for c in body) + end_of_body(True)
        assert parse_request(wire)[1:] == [BodyChunk(b"".join(body)), MessageEnd()]

    def test_error_response(self):
        assert error_response(502) == (
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 16\r\nConnection: close\r\n\r\n502 Bad Gateway\n"
        )

    def test_error_response_407(self):
        raw = error_response(407, headers=[("Proxy-Authenticate", 'Basic realm="zep"')], body="auth needed\n")
        assert raw == (
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"zep\"\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
            b"auth needed\n"
        )
        events, _ = parse_response(raw)
        assert events[0].status == 407 and not events[0].keep_alive
        assert events[1:] == [BodyChunk(b"auth needed\n"), MessageEnd()]

    def test_error_response_reason_is_one_line(self):
        raw = error_response(400, reason="bad\r\nX-Injected: 1", body="é")
        assert raw.startswith(b"HTTP/1.1 400 bad  X-Injected: 1\r\nContent-Type")
        assert raw.endswith(b"Content-Length: 2\r\nConnection: close\r\n\r\n\xc3\xa9")

    def test_error_response_unknown_status(self):
        assert error_response(599).startswith(b"HTTP/1.1 599 Error\r\n")


# Property tests

REQUEST_EVENTS = (RequestHead, BodyChunk, MessageEnd, BadMessage)
RESPONSE_EVENTS = (ResponseHead, BodyChunk, MessageEnd, BadMessage)


def check_event_stream(events, types):
    assert all(isinstance(e, types) for e in events)
    assert not any(isinstance(e, BadMessage) for e in events[:-1])


SAMPLE_REQUEST = (
    b"POST http://a.example:81/p?q HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    b"GET http://b/ HTTP/1.0\r\nProxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    b"CONNECT c:443 HTTP/1.1\r\nHost: h\r\n\r\n"
)
SAMPLE_RESPONSE = (
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)


def mutations(sample: bytes):
    """Valid messages with a few bytes changed, inserted or removed: reaches the deep states."""

    @st.composite
    def mutate(draw):
        data = bytearray(sample)
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(["flip", "insert", "delete"]))
            byte = draw(st.sampled_from([0, 9, 10, 13, 32, 44, 48, 58, 59, 65, 102, 127, 255]))
            if action == "insert" or pos == len(data):
                data[pos:pos] = bytes([byte])
            elif action == "flip":
                data[pos] = byte
            else:
                del data[pos]
        return bytes(data)

    return mutate()


chunk_lists = st.lists(st.binary(max_size=64), max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.one_of(chunk_lists, mutations(SAMPLE_REQUEST).map(lambda d: [d])), st.integers(16, 70000))
def test_request_reader_never_raises(chunks, max_head):
    reader = RequestReader(max_head_bytes=max_head)
    events = []
    for chunk in chunks:
        events += reader.feed(chunk)
    reader.take_leftover()
    check_event_stream(events, REQUEST_EVENTS)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(chunk_lists, mutations(SAMPLE_RESPONSE).map(lambda d: [d])),
    st.sampled_from(["GET", "HEAD", "POST"]),
)
def test_response_reader_never_raises(chunks, method):
    reader = ResponseReader(method)
    events = []
    for chunk in chunks:
        events += reader.feed(chunk)
    events += reader.feed_eof()
    check_event_stream(events, RESPONSE_EVENTS)
    if reader.final:
        assert isinstance(events[-1], MessageEnd)


@settings(max_examples=200, deadline=None)
@given(mutations(SAMPLE_REQUEST), st.data())
def test_mutated_requests_split_anywhere_give_the_same_events(data, draw):
    whole = parse_request(data)
    splits = draw.draw(st.lists(st.integers(0, len(data)), max_size=6))
    assert parse_request(data, splits) == whole


tokens = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower()
    not in {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host"}
    and not n.lower().startswith("proxy-")
)
values = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)
header_lists = st.lists(st.tuples(tokens, values), max_size=5)
hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: ip.compressed),
)
bodies = st.binary(max_size=300)


@st.composite
def requests(draw, keep_alive=True):
    """(wire bytes, expected events) for one valid proxy request."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    host = draw(hosts)
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    path = draw(st.from_regex(r"(/[A-Za-z0-9._~%-]{0,10}){0,3}", fullmatch=True))
    query = draw(st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9=&]{0,12}", fullmatch=True)))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    headers = draw(header_lists)
    body = draw(st.one_of(st.none(), bodies))
    chunked = body is not None and version == "1.1" and draw(st.booleans())

    authority = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    target = (path or "/") + (f"?{query}" if query is not None else "")
    wire = f"{method} http://{authority}{path}{'?' + query if query is not None else ''} HTTP/{version}\r\n".encode()
    wire += f"Host: {authority}\r\n".encode() + b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)
    if version == "1.0" and keep_alive:
        wire += b"Connection: keep-alive\r\n"
    elif version == "1.1" and not keep_alive:
        wire += b"Connection: close\r\n"
    if chunked:
        wire += b"Transfer-Encoding: chunked\r\n\r\n"
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(body))), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        wire += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    elif body is not None:
        wire += b"Content-Length: %d\r\n\r\n" % len(body) + body
    else:
        wire += b"\r\n"
    expected = [
        RequestHead(
            method=method,
            host=host,
            port=port or 80,
            target=target.encode(),
            version=version,
            headers=((b"Host", authority.encode()),) + tuple((n.encode(), v.encode()) for n, v in headers),
            proxy_authorization=None,
            keep_alive=keep_alive,
            chunked=chunked,
            content_length=len(body) if body is not None and not chunked else None,
        )
    ]
    if body:
        expected.append(BodyChunk(body))
    expected.append(MessageEnd())
    return wire, expected


@st.composite
def request_streams(draw):
    """One to three pipelined requests, maybe ending in a CONNECT with early bytes."""
    first = draw(requests())
    rest = draw(st.lists(requests(), max_size=1))
    last = draw(requests(keep_alive=draw(st.booleans())))
    wire = first[0] + b"".join(w for w, _ in rest) + last[0]
    expected = first[1] + [e for _, ev in rest for e in ev] + last[1]
    leftover = b""
    if last[1][0].keep_alive and draw(st.booleans()):
        host = draw(hosts)
        port = draw(st.integers(1, 65535))
        authority = (f"[{host}]" if ":" in host else host) + f":{port}"
        leftover = draw(st.binary(max_size=30))
        wire += f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + leftover
        expected += [
            RequestHead("CONNECT", host, port, b"", "1.1", ((b"Host", authority.encode()),), None, True, False, None),
            MessageEnd(),
        ]
    return wire, expected, leftover


@settings(max_examples=150, deadline=None)
@given(request_streams(), st.data())
def test_valid_requests_any_split_give_the_same_events(stream, data):
    wire, expected, leftover = stream
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    for cuts in ([], splits):
        reader = RequestReader()
        assert feed(reader, wire, cuts) == expected
        assert reader.take_leftover() == leftover


@settings(max_examples=25, deadline=None)
@given(request_streams())
def test_valid_requests_split_at_every_boundary(stream):
    wire, expected, leftover = stream
    for cut in range(len(wire) + 1):
        reader = RequestReader()
        assert feed(reader, wire, [cut]) == expected
        assert reader.take_leftover() == leftover


@settings(max_examples=25, deadline=None)
@given(requests())
def test_valid_request_one_byte_at_a_time(request):
    wire, expected = request
    assert feed(RequestReader(), wire, range(len(wire))) == expected


@st.composite
def responses(draw):
    """(request method, wire bytes, expected events, whether it needs EOF) for one valid exchange."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
    wire = b""
    expected: list = []
    for status in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        hdrs = draw(header_lists)
        wire += b"HTTP/1.1 %d Interim\r\n" % status + b"".join(f"{n}: {v}\r\n".encode() for n, v in hdrs) + b"\r\n"
        expected += [
            ResponseHead(status, b"Interim", "1.1", tuple((n.encode(), v.encode()) for n, v in hdrs), False, None, True),
            MessageEnd(),
        ]
    status = draw(st.sampled_from([200, 201, 204, 301, 304, 404, 500]))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    hdrs = draw(header_lists)
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = draw(bodies)
    no_body = method == "HEAD" or status in (204, 304)
    if framing == "chunked" and version == "1.0":
        framing = "length"
    wire += f"HTTP/{version} {status} Reason Phrase\r\n".encode() + b"".join(f"{n}: {v}\r\n".encode() for n, v in hdrs)
    content_length = None
    if framing == "length":
        content_length = len(body)
        wire += b"Content-Length: %d\r\n" % len(body)
    elif framing == "chunked":
        wire += b"Transfer-Encoding: chunked\r\n"
    close_delimited = framing == "close" and not no_body
    if version == "1.0" and not close_delimited:
        wire += b"Connection: keep-alive\r\n"
    wire += b"\r\n"
    expected.append(
        ResponseHead(
            status,
            b"Reason Phrase",
            version,
            tuple((n.encode(), v.encode()) for n, v in hdrs),
            framing == "chunked" and not no_body,
            content_length,
            not close_delimited,
            close_delimited,
        )
    )
    if not no_body:
        if framing == "chunked":
            wire += (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        else:
            wire += body
        if body:
            expected.append(BodyChunk(body))
    expected.append(MessageEnd())
    return method, wire, expected, close_delimited


def run_response(method, wire, cuts, needs_eof):
    reader = ResponseReader(method)
    events = feed(reader, wire, cuts)
    if needs_eof:
        assert not reader.final
        events = normalize(events + reader.feed_eof())
    assert reader.final
    return events


@settings(max_examples=150, deadline=None)
@given(responses(), st.data())
def test_valid_responses_any_split_give_the_same_events(response, data):
    method, wire, expected, needs_eof = response
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    assert run_response(method, wire, [], needs_eof) == expected
    assert run_response(method, wire, splits, needs_eof) == expected


@settings(max_examples=25, deadline=None)
@given(responses())
def test_valid_responses_split_at_every_boundary(response):
    method, wire, expected, needs_eof = response
    for cut in range(len(wire) + 1):
        assert run_response(method, wire, [cut], needs_eof) == expected
    assert run_response(method, wire, range(len(wire)), needs_eof) == expected
