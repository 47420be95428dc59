"""The tenants file and tenants' password hashes: parsing, every refusal, verification."""

from __future__ import annotations

import os
import textwrap

import pytest

from zep.config import ConfigError
from zep.passwords import BadHash, Verifier, check_hash_syntax, hash_password, verify_password
from zep.tenants import load_tenants

HASH = hash_password("s3cret")


def write(tmp_path, text: str):
    path = tmp_path / "tenants.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_hash_round_trip_and_salt():
    assert verify_password("s3cret", HASH)
    assert not verify_password("s3cret ", HASH)
    assert not verify_password("", HASH)
    other = hash_password("s3cret")
    assert other != HASH  # a fresh salt each time
    assert verify_password("s3cret", other)


@pytest.mark.parametrize("text", [
    "", "plain", "scrypt$14$8$1$c2FsdA", "bcrypt$14$8$1$c2FsdA$" + "A" * 43,
    "scrypt$x$8$1$c2FsdA$" + "A" * 43, "scrypt$14$8$1$!!!$" + "A" * 43,
    "scrypt$14$8$1$c2FsdA$QUJD",  # key of the wrong length
    "scrypt$30$8$1$c2FsdA$" + "A" * 43,  # n far too large
])
def test_damaged_hashes_are_refused(text):
    with pytest.raises(BadHash):
        check_hash_syntax(text)


def test_verifier_remembers_only_accepted_pairs():
    verifier = Verifier("team-a", HASH)
    assert verifier.matches("team-a", "s3cret")
    assert verifier.matches(b"team-a", b"s3cret")  # remembered: the same answer, now without scrypt
    assert not verifier.matches("team-b", "s3cret")
    assert not verifier.matches("team-a", "wrong")
    assert len(verifier._accepted) == 1


def test_a_tenants_file(tmp_path):
    secret = tmp_path / "b-password"
    secret.write_text("b-pass\n")
    path = write(tmp_path, f"""
        [[tenant]]
        name = "team-a"
        password_hash = "{HASH}"
        identities = ["/ids/a/*.json", "/ids/a2.json"]
        fallback = "DENY"
        egress = ["allow *.corp.example:443"]

        [[tenant]]
        name = "team-b"
        username = "b-ci"
        password_file = "{secret}"
        identity_env = "TEAM_B_IDENTITY"
    """)
    tenants = load_tenants(path, {"TEAM_B_IDENTITY": "e30="})
    a, b = tenants.tenants
    assert (a.name, a.username, a.identities, a.fallback, a.egress) == (
        "team-a", "team-a", ("/ids/a/*.json", "/ids/a2.json"), "deny", ("allow *.corp.example:443",))
    assert (b.name, b.username, b.identity_env, b.fallback) == ("team-b", "b-ci", "TEAM_B_IDENTITY", None)
    assert b.verifier().matches("b-ci", "b-pass")  # the file's trailing newline is not part of it
    assert set(tenants.by_username()) == {"team-a", "b-ci"}
    assert "b-pass" not in repr(tenants) and HASH not in repr(tenants)


@pytest.mark.parametrize("body, message", [
    ("", "defines no tenant"),
    ("[tenants]\nx = 1\n", "unknown top-level key 'tenants'"),
    ('[[tenant]]\nname = "a b"\npassword_hash = "{h}"\n', "tenant 1: name must be"),
    ('[[tenant]]\nname = "a"\n', "tenant 'a': set exactly one of password_hash and password_file"),
    ('[[tenant]]\nname = "a"\npassword_hash = "nope"\n', "tenant 'a': password_hash is not a zep password hash"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\npassword_file = "/x"\n', "set exactly one"),
    ('[[tenant]]\nname = "a"\npassword_file = "/nonexistent/pw"\n', "cannot read password_file /nonexistent/pw"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\ncolour = "red"\n', "unknown key 'colour'"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\nidentities = "/x.json"\n', "identities must be a list"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\nidentity_env = "UNSET_VARIABLE"\n', "UNSET_VARIABLE, which is not set"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\nfallback = "maybe"\n', "fallback must be one of"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\n[[tenant]]\nname = "a"\npassword_hash = "{h}"\n',
     "two tenants have the name 'a'"),
    ('[[tenant]]\nname = "a"\npassword_hash = "{h}"\n[[tenant]]\nname = "b"\nusername = "a"\npassword_hash = "{h}"\n',
     "two tenants have the username 'a'"),
    ("[[tenant]\n", "is not valid TOML"),
])
def test_every_mistake_names_the_file_tenant_and_key(tmp_path, body, message):
    path = write(tmp_path, body.replace("{h}", HASH))
    with pytest.raises(ConfigError) as caught:
        load_tenants(path, {})
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"ZEP_TENANTS: {path}")
    assert HASH not in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tenants(os.fspath(tmp_path / "none.toml"), {})
