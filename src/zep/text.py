"""Bytes from the wire as text for log lines and error messages (never a Python `b'...'` repr)."""

from __future__ import annotations

MOST_SHOWN = 200  # a log line stays a line, whatever a client sends


def printable(data: bytes, limit: int = MOST_SHOWN) -> str:
    """Printable ASCII as it is; anything else (control bytes, non-ASCII, backslash) as \\xNN."""
    text = "".join(chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}" for byte in data[:limit])
    return text + ("..." if len(data) > limit else "")


def request_target(target: bytes) -> str:
    """A request target for a log line: without its query string or user information (user:pass@),
    which may hold secrets."""
    shown = target.partition(b"?")[0]
    scheme, sep, rest = shown.partition(b"://")
    authority, slash, path = rest.partition(b"/")
    if sep and b"@" in authority:
        shown = scheme + sep + authority.rpartition(b"@")[2] + slash + path
    return printable(shown)
