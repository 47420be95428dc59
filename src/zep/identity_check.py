"""Pre-flight of a Ziti identity document, before the SDK sees it.

The native library does not refuse a damaged identity at once: an unreadable key or certificate,
a missing `id` or a controller that is not a URL are logged on its stderr while the load goes on
until the load timeout. So zep checks what the SDK needs (ZITI.md) and names the field at fault:

- a JSON object with a controller: `ztAPI` (a string) or `ztAPIs` (a non-empty list), http(s) URLs;
- `id.key`: a PEM private key, inline (`pem:` prefix or bare PEM), a `file:` URL or a plain file
  name, as the SDK reads them (`load_key_internal` in the C SDK, `load_key` in tlsuv), or a
  `pkcs11://` / `keychain:` reference, which names a key held elsewhere and is not checked here;
- `id.cert` (required unless the key is such a reference) and `id.ca` (when present): one or more
  PEM certificates in the same forms (`parse_ref`).

A PEM block is checked for its structure only: the right BEGIN/END labels around a base64 body
that decodes to one DER SEQUENCE. Messages name fields and files, never their contents.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

PRIVATE_KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")
CERTIFICATE_LABEL = "CERTIFICATE"
# Keys the SDK loads from a token or the OS keychain: their material is not in the file.
KEY_REFERENCES = ("pkcs11://", "keychain:")

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL)


class InvalidIdentity(ValueError):
    """An identity the SDK would not load; the message names the identity and the field."""


def check_identity(label: str, data: bytes) -> str:
    """Check an identity document; returns its (first) controller URL, raises InvalidIdentity."""

    def fail(problem: str) -> InvalidIdentity:
        return InvalidIdentity(f"Ziti identity {label}: {problem}")

    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise fail("is not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise fail(f"is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(document, dict):
        raise fail(f"is a JSON {_json_kind(document)}, not an object with ztAPI and id")
    controllers = _controllers(document, fail)
    identity = document.get("id")
    if not isinstance(identity, dict):
        raise fail("has no id object (id.key, id.cert)" if identity is None else "id is not an object")
    key = _string_field(identity, "key", fail)
    if key.startswith(KEY_REFERENCES):
        needs_cert = False
    else:
        needs_cert = True
        if not _has_pem(_material(key, "id.key", fail), PRIVATE_KEY_LABELS):
            raise fail("id.key is not a PEM private key")
    if needs_cert or "cert" in identity:
        cert = _string_field(identity, "cert", fail)
        if not _has_pem(_material(cert, "id.cert", fail), (CERTIFICATE_LABEL,), only=True):
            raise fail("id.cert is not a PEM certificate")
    if identity.get("ca") is not None:
        ca = _string_field(identity, "ca", fail)
        if not _has_pem(_material(ca, "id.ca", fail), (CERTIFICATE_LABEL,), only=True):
            raise fail("id.ca is not a PEM certificate bundle")
    return controllers[0]


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _controllers(document: dict, fail: Any) -> list[str]:
    """`ztAPI` first, then `ztAPIs`, as the SDK reads them; each must be an http(s) URL with a host."""
    found: list[tuple[str, Any]] = []
    if document.get("ztAPI") is not None:
        found.append(("ztAPI", document["ztAPI"]))
    listed = document.get("ztAPIs")
    if listed is not None:
        if not isinstance(listed, list):
            raise fail("ztAPIs is not a list of controller URLs")
        found += [(f"ztAPIs[{i}]", url) for i, url in enumerate(listed)]
    if not found:
        raise fail("has no controller URL (ztAPI or ztAPIs)")
    for name, url in found:
        if not _is_http_url(url):
            raise fail(f"{name} is not an http(s) URL")
    return [url for _, url in found]


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _string_field(identity: dict, name: str, fail: Any) -> str:
    value = identity.get(name)
    if value is None:
        raise fail(f"id.{name} is missing")
    if not isinstance(value, str) or not value.strip():
        raise fail(f"id.{name} is not a string")
    return value


def _material(value: str, field: str, fail: Any) -> str:
    """The PEM text a field holds or refers to: `pem:` is stripped; `file:` URLs and plain paths
    are read (the SDK's TLS layer tries a key or certificate string as a file name first)."""
    if value.startswith("pem:"):
        return value[len("pem:"):]
    if value.startswith("file:"):
        path = _file_url_path(value)
        if path is None:
            raise fail(f"{field} is not a usable file: URL (use file:///absolute/path)")
    elif "-----BEGIN" not in value and (value.startswith(("/", "./", "../")) or os.path.isfile(value)):
        path = value
    else:
        return value
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", errors="replace")
    except OSError as exc:
        raise fail(f"{field} refers to {path}, which cannot be read ({exc.strerror})") from None


def _file_url_path(value: str) -> str | None:
    """The path of `file:/p`, `file:///p` or `file://host/p`, as the SDK's URL parser gives it."""
    if not value.startswith("file:/"):
        return None
    rest = value[len("file:/"):]
    if not rest.startswith("/"):
        return "/" + rest
    rest = rest[1:]
    if rest.startswith("/"):
        return rest
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else None


def _has_pem(text: str, labels: tuple[str, ...], only: bool = False) -> bool:
    """True when `text` holds a well-formed PEM block with one of `labels` and, with `only`, no
    other kind of block (other blocks, such as EC PARAMETERS before an EC key, are let be)."""
    found = False
    for block in _PEM_BLOCK.finditer(text):
        begin, body, end = block.groups()
        if begin != end:
            return False
        if begin in labels:
            if not _is_der_sequence(body):
                return False
            found = True
        elif only:
            return False
    return found


def _is_der_sequence(body: str) -> bool:
    """The base64 body decodes to exactly one DER SEQUENCE (tag 0x30 and a length that fits)."""
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(der) < 2 or der[0] != 0x30:
        return False
    first = der[1]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(der) < 2 + count:
            return False
        header, length = 2 + count, int.from_bytes(der[2:2 + count], "big")
    return header + length == len(der)
