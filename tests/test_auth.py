import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from zep.auth import Credentials, parse_basic


def basic(raw: bytes, scheme: bytes = b"Basic") -> bytes:
    return scheme + b" " + base64.b64encode(raw)


class TestCredentials:
    creds = Credentials("alice", "s3cret")

    def test_matches_str_and_bytes(self):
        assert self.creds.matches("alice", "s3cret")
        assert self.creds.matches(b"alice", b"s3cret")

    def test_wrong_user_or_password(self):
        assert not self.creds.matches("alice", "nope")
        assert not self.creds.matches("bob", "s3cret")
        assert not self.creds.matches("", "")
        assert not self.creds.matches("alice", "s3cret ")

    def test_non_ascii_compared_as_utf8(self):
        creds = Credentials("jürgen", "pässwörd")
        assert creds.matches("jürgen".encode(), "pässwörd".encode())
        assert creds.matches("jürgen", "pässwörd")
        assert not creds.matches("jürgen".encode("latin-1"), "pässwörd".encode("latin-1"))

    def test_password_not_in_repr(self):
        assert "s3cret" not in repr(self.creds)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.text(), st.binary()), st.one_of(st.text(), st.binary()))
    def test_never_raises(self, user, password):
        assert self.creds.matches(user, password) is (
            user in ("alice", b"alice") and password in ("s3cret", b"s3cret")
        )


class TestParseBasic:
    def test_valid(self):
        assert parse_basic(basic(b"user:pass")) == ("user", "pass")

    def test_scheme_case_insensitive_and_whitespace(self):
        assert parse_basic(basic(b"user:pass", b"bAsIc")) == ("user", "pass")
        assert parse_basic(b"  Basic   " + base64.b64encode(b"u:p") + b"  ") == ("u", "p")

    def test_password_may_contain_colons_and_be_empty(self):
        assert parse_basic(basic(b"user:pa:ss")) == ("user", "pa:ss")
        assert parse_basic(basic(b"user:")) == ("user", "")
        assert parse_basic(basic(b":")) == ("", "")

    def test_utf8(self):
        assert parse_basic(basic("jürgen:pä".encode())) == ("jürgen", "pä")

    def test_absent_or_malformed(self):
        assert parse_basic(None) is None
        assert parse_basic(b"") is None
        assert parse_basic(b"Basic") is None
        assert parse_basic(b"Basic ") is None
        assert parse_basic(b"Bearer " + base64.b64encode(b"u:p")) is None
        assert parse_basic(b"Basic !!!notbase64") is None
        assert parse_basic(b"Basic dXNlcjpwYXM") is None  # truncated: bad padding
        assert parse_basic(basic(b"no-colon")) is None
        assert parse_basic(basic(b"\xff\xfe:x")) is None  # not UTF-8
        assert parse_basic(b"Basic \xff\xff") is None

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.none(), st.binary(), st.binary().map(lambda b: b"Basic " + b)))
    def test_never_raises(self, value):
        result = parse_basic(value)
        assert result is None or (isinstance(result, tuple) and all(isinstance(s, str) for s in result))

    @settings(max_examples=200, deadline=None)
    @given(st.text().filter(lambda s: ":" not in s), st.text())
    def test_round_trip(self, user, password):
        raw = f"{user}:{password}".encode("utf-8", "surrogatepass")
        expected = (user, password)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            expected = None  # lone surrogates are not valid UTF-8 on the wire
        assert parse_basic(basic(raw)) == expected
