"""Identity pre-flight: every way an identity can be unusable, with its exact message, in process
and through `zep serve` (exit 2 before the SDK sees the identity); identities made with a real key."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.zepproc import run_zep
from tests.support.ziti import CONTROLLER, credentials, identity_document, openziti_path, standin_library  # noqa: F401
from zep.identity_check import InvalidIdentity, check_identity

KEY, CERT = credentials()
OTHER_KEY, OTHER_CERT = credentials("another")
LABEL = "/ids/ci.json"


def document(**id_fields: Any) -> dict[str, Any]:
    doc = identity_document()
    doc["id"].update(id_fields)
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def without(key: str, inner: str | None = None) -> Callable[[dict], dict]:
    def edit(doc: dict) -> dict:
        (doc if inner is None else doc[key]).pop(inner or key)
        return doc
    return edit


def setting(path: str, value: Any) -> Callable[[dict], dict]:
    def edit(doc: dict) -> dict:
        target = doc
        *parents, last = path.split(".")
        for name in parents:
            target = target[name]
        target[last] = value
        return doc
    return edit


def damaged_base64(pem: str) -> str:
    lines = pem.splitlines()
    lines[1] = "!!" + lines[1][2:]
    return "\n".join(lines)


def truncated_der(pem: str) -> str:
    lines = pem.splitlines()
    return "\n".join([lines[0], *lines[1:-2], lines[-1]])  # one base64 line short: the length no longer fits


FAILURES: list[tuple[str, Callable[[dict], Any], str]] = [
    ("not-json", lambda doc: b"{ nope", "is not JSON (Expecting property name enclosed in double quotes at line 1 column 3)"),
    ("binary", lambda doc: b"\xff\xfe{}", "is not JSON (not UTF-8 text)"),
    ("array", lambda doc: [doc], "is a JSON array, not an object with ztAPI and id"),
    ("string", lambda doc: "identity", "is a JSON string, not an object with ztAPI and id"),
    ("no-ztapi", without("ztAPI"), "has no controller URL (ztAPI or ztAPIs)"),
    ("empty-ztapis", lambda doc: {**without("ztAPI")(doc), "ztAPIs": []}, "has no controller URL (ztAPI or ztAPIs)"),
    ("ztapi-no-scheme", setting("ztAPI", "ctrl.example.com:1280"), "ztAPI is not an http(s) URL"),
    ("ztapi-ftp", setting("ztAPI", "ftp://ctrl.example.com"), "ztAPI is not an http(s) URL"),
    ("ztapi-number", setting("ztAPI", 1280), "ztAPI is not an http(s) URL"),
    ("ztapi-bad-port", setting("ztAPI", "https://ctrl.example.com:99999"), "ztAPI is not an http(s) URL"),
    ("ztapis-second-bad", setting("ztAPIs", [CONTROLLER, "https://"]), "ztAPIs[1] is not an http(s) URL"),
    ("ztapis-not-list", setting("ztAPIs", CONTROLLER), "ztAPIs is not a list of controller URLs"),
    ("no-id", without("id"), "has no id object (id.key, id.cert)"),
    ("id-string", setting("id", "pem:x"), "id is not an object"),
    ("no-key", without("id", "key"), "id.key is missing"),
    ("key-number", setting("id.key", 7), "id.key is not a string"),
    ("key-not-pem", setting("id.key", "pem:not a key at all"), "id.key is not a PEM private key"),
    ("key-is-a-cert", setting("id.key", "pem:" + CERT), "id.key is not a PEM private key"),
    ("key-bad-base64", setting("id.key", "pem:" + damaged_base64(KEY)), "id.key is not a PEM private key"),
    ("key-truncated", setting("id.key", "pem:" + truncated_der(KEY)), "id.key is not a PEM private key"),
    ("key-mismatched-markers", setting("id.key", KEY.replace("END PRIVATE KEY", "END EC PRIVATE KEY")),
     "id.key is not a PEM private key"),
    ("no-cert", without("id", "cert"), "id.cert is missing"),
    ("cert-not-pem", setting("id.cert", "pem:standin-cert"), "id.cert is not a PEM certificate"),
    ("cert-is-a-key", setting("id.cert", "pem:" + KEY), "id.cert is not a PEM certificate"),
    ("cert-bad-base64", setting("id.cert", damaged_base64(CERT)), "id.cert is not a PEM certificate"),
    ("ca-not-pem", setting("id.ca", "pem:standin-ca"), "id.ca is not a PEM certificate bundle"),
    ("ca-with-a-key", setting("id.ca", "pem:" + CERT + KEY), "id.ca is not a PEM certificate bundle"),
    ("ca-truncated", setting("id.ca", "pem:" + truncated_der(CERT)), "id.ca is not a PEM certificate bundle"),
    ("key-file-missing", setting("id.key", "file:///nonexistent/zep/key.pem"),
     "id.key refers to /nonexistent/zep/key.pem, which cannot be read (No such file or directory)"),
    ("cert-path-missing", setting("id.cert", "/nonexistent/zep/cert.pem"),
     "id.cert refers to /nonexistent/zep/cert.pem, which cannot be read (No such file or directory)"),
    ("cert-file-relative", setting("id.cert", "file:cert.pem"),
     "id.cert is not a usable file: URL (use file:///absolute/path)"),
    ("ca-file-host-only", setting("id.ca", "file://ca.pem"), "id.ca is not a usable file: URL (use file:///absolute/path)"),
]


def failing_data(make: Callable[[dict], Any]) -> bytes:
    result = make(copy.deepcopy(identity_document()))
    return result if isinstance(result, bytes) else encode(result)


@pytest.mark.parametrize("make, problem", [(m, p) for _, m, p in FAILURES], ids=[name for name, _, _ in FAILURES])
def test_each_failure_names_the_identity_and_the_field(make: Callable[[dict], Any], problem: str) -> None:
    with pytest.raises(InvalidIdentity) as caught:
        check_identity(LABEL, failing_data(make))
    assert str(caught.value) == f"Ziti identity {LABEL}: {problem}"
    for secret in (KEY, CERT):
        assert secret.splitlines()[2] not in str(caught.value)


def test_a_file_named_by_path_is_checked_for_what_it_holds(tmp_path: Path) -> None:
    cert_file = pem_file(tmp_path, "cert.pem", CERT)
    with pytest.raises(InvalidIdentity, match=r"id\.key is not a PEM private key$"):
        check_identity(LABEL, encode(document(key=str(cert_file))))
    with pytest.raises(InvalidIdentity, match=r"id\.cert is not a PEM certificate$"):
        check_identity(LABEL, encode(document(cert=f"file://{pem_file(tmp_path, 'key.pem', KEY)}")))


def test_key_material_never_appears_in_a_message() -> None:
    secret = "pem:-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----"
    with pytest.raises(InvalidIdentity) as caught:
        check_identity(LABEL, encode(document(key=secret)))
    assert "c2VjcmV0" not in str(caught.value) and "secret" not in str(caught.value)


def pem_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_forms_the_sdk_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key_file, cert_file = pem_file(tmp_path, "key.pem", KEY), pem_file(tmp_path, "cert.pem", CERT)
    traditional = serialization.load_pem_private_key(KEY.encode(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()).decode()
    accepted = [
        document(),  # pem: inline, as the fixtures write
        document(key=KEY, cert=CERT, ca=CERT + OTHER_CERT),  # bare PEM (what enrollment writes), a CA bundle
        document(key=f"file://{key_file}", cert=f"file://{cert_file}", ca=f"file:{cert_file}"),
        document(key=f"file://localhost{key_file}", cert=f"file:{cert_file}"),
        document(key=str(key_file), cert=str(cert_file), ca=str(cert_file)),  # plain file names
        document(key="-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n" + traditional),
        document(key="pkcs11:///usr/lib/softhsm/libsofthsm2.so?slot=0&id=01", cert=None, ca=None),
    ]
    for doc in accepted:
        doc["id"] = {k: v for k, v in doc["id"].items() if v is not None}
        assert check_identity(LABEL, encode(doc)) == CONTROLLER, doc["id"]
    assert check_identity(LABEL, encode({**without("ztAPI")(document()), "ztAPIs": ["http://c1:80", "https://c2"]})) \
        == "http://c1:80"


# ----------------------------------------------------------------------------- through `zep serve`


@pytest.mark.parametrize("make, problem", [(m, p) for _, m, p in FAILURES], ids=[name for name, _, _ in FAILURES])
def test_serve_exits_2_with_one_line_before_loading(tmp_path: Path, openziti_path: Path,  # noqa: F811
                                                    make: Callable[[dict], Any], problem: str) -> None:
    path = tmp_path / "ci.json"
    path.write_bytes(failing_data(make))
    result = run_zep("serve", "--host", "127.0.0.1", "--socks-port", "0", "--http-port", "0", "--identity", str(path),
                     env={"ZITI_LOG": "4"}, extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [f"zep: error: Ziti identity {path}: {problem}"]  # the SDK never ran


def test_base64_identity_is_checked_too(openziti_path: Path) -> None:  # noqa: F811
    import base64

    encoded = base64.b64encode(encode(document(cert="pem:nope"))).decode()
    result = run_zep("serve", "--host", "127.0.0.1", "--socks-port", "0", "--http-port", "0",
                     env={"ZITI_IDENTITY": encoded}, extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["zep: error: Ziti identity ZITI_IDENTITY: id.cert is not a PEM certificate"]
