"""Enrollment with one-time tokens: the stand-in's `Ziti_enroll_identity` under the real
`openziti.enroll`."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from tests.support.upstreams import Upstream
from tests.support.ziti import (  # noqa: F401  (fixtures)
    CONTROLLER,
    enrollment_claims,
    jwt,
    openziti_path,
    sdk_on_path,
    service,
    standin_library,
    write_enrollment_token,
)
from zep.identity_check import check_identity

HOST = "web.enrolled.test"


def web(http_a: Upstream) -> list[dict]:
    return [service("web", [HOST], ["80"], f"127.0.0.1:{http_a.port}")]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def used_tokens(token_file: Path) -> list[str]:
    ledger = Path(f"{token_file}.used")
    return ledger.read_text().split() if ledger.exists() else []


def claims_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# ----------------------------------------------------------------------------- the stand-in under openziti.enroll


@pytest.fixture
def openziti(sdk_on_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.delenv("ZITI_IDENTITIES", raising=False)
    import openziti

    return openziti


def test_standin_enrolls_once_and_returns_an_identity(openziti, tmp_path: Path, http_a: Upstream) -> None:
    token_file = tmp_path / "ci.jwt"
    token = write_enrollment_token(token_file, web(http_a))
    identity = openziti.enroll(token)  # Ziti_enroll_identity; the package frees the returned JSON
    document = json.loads(identity)
    assert document["ztAPI"] == CONTROLLER and document["ztAPIs"] == [CONTROLLER]
    assert document["id"]["key"].startswith("-----BEGIN PRIVATE KEY-----")  # bare PEM, as the SDK writes it
    assert check_identity("enrolled", identity.encode()) == CONTROLLER
    assert document["standin"]["services"][0]["name"] == "web"
    assert used_tokens(token_file) == [claims_of(token)["jti"]]
    assert mode(Path(f"{token_file}.used")) == 0o600
    with pytest.raises(RuntimeError, match="^JWT not accepted by controller$"):  # one-time
        openziti.enroll(token)
    with pytest.raises(RuntimeError, match="^JWT not accepted by controller$"):  # from the file: the same token
        openziti.enroll(str(token_file))


@pytest.mark.parametrize("token", [
    "not-a-jwt",
    "only.two",
    "a.b.c.d",
    "!!!.e30.c2ln",  # header is not base64url
    f"{base64.urlsafe_b64encode(b'[1]').decode()}.e30.c2ln",  # header is not an object
    "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",  # claims without iss, jti, em
])
def test_standin_refuses_a_malformed_token_with_the_sdk_code(openziti, token: str) -> None:
    with pytest.raises(RuntimeError, match="^JWT has invalid format$"):
        openziti.enroll(token)


def test_standin_refuses_an_expired_token(openziti, tmp_path: Path) -> None:
    token = write_enrollment_token(tmp_path / "old.jwt", expires_in=-60)
    with pytest.raises(RuntimeError, match="^JWT not accepted by controller$"):
        openziti.enroll(token)
    assert used_tokens(tmp_path / "old.jwt") == []


def test_standin_token_for_a_real_controller_cannot_reach_it(openziti, tmp_path: Path) -> None:
    claims = enrollment_claims(tmp_path / "real.jwt")
    del claims["standin"]
    with pytest.raises(RuntimeError, match="^ziti controller is not available$"):
        openziti.enroll(jwt(claims))
