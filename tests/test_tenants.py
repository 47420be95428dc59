"""The tenants file and tenants' password hashes: parsing, every refusal, verification."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest

from zep.config import ConfigError, Settings
from zep.passwords import BadHash, Verifier, check_hash_syntax, hash_password, verify_password
from zep.tenant_login import Accepted, TenantLogins
from zep.tenants import Tenant, front_settings, load_tenants

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


def test_the_front_s_name_is_reserved(tmp_path):
    path = write(tmp_path, f'[[tenant]]\nname = "front"\npassword_hash = "{HASH}"\n')
    with pytest.raises(ConfigError, match="'front' is zep's own"):
        load_tenants(path, {})


def test_a_bad_egress_rule_names_the_tenant_and_the_rule(tmp_path):
    path = write(tmp_path, f'[[tenant]]\nname = "a"\npassword_hash = "{HASH}"\negress = ["allow *:443", "permit x"]\n')
    with pytest.raises(ConfigError, match="""tenant 'a': egress: egress rule 2 "permit x": the action"""):
        load_tenants(path, {})


def test_worker_settings_carry_only_the_tenant_s_identities_fallback_and_rules(tmp_path):
    path = write(tmp_path, f"""
        [[tenant]]
        name = "team-a"
        password_hash = "{HASH}"
        identities = ["/ids/a/*.json"]
        egress = ["allow *.a.example:443"]

        [[tenant]]
        name = "team-b"
        password_hash = "{HASH}"
        identity_env = "TEAM_B_IDENTITY"
        fallback = "deny"
    """)
    environ = {"TEAM_B_IDENTITY": "e30="}
    a, b = load_tenants(path, environ).tenants
    settings = Settings(tenants=path, egress_rules=("deny *",), username="", password="", ready_file="/r.json")
    sa, sb = a.worker_settings(settings, environ), b.worker_settings(settings, environ)
    assert (sa.ziti_identities, sa.ziti_identity, sa.fallback) == (("/ids/a/*.json",), None, "direct")
    assert sa.egress_rules == ("allow *.a.example:443", "deny *")  # the tenant's first
    assert (sb.ziti_identities, sb.ziti_identity, sb.fallback, sb.egress_rules) == ((), "e30=", "deny", ("deny *",))
    for derived in (sa, sb):
        assert (derived.tenants, derived.username, derived.password, derived.ready_file) == (None, "", "", None)
    with pytest.raises(ConfigError, match="tenant 'team-a': fallback proxy needs an upstream proxy"):
        dataclasses.replace(a, fallback="proxy").worker_settings(settings, environ)


def test_front_settings_hold_no_identity():
    settings = Settings(tenants="/t.toml", ziti_identities=("/x.json",), ziti_identity="e30=", enroll_token="t")
    front = front_settings(settings)
    assert not front.ziti_configured and front.tenants is None and not front.auth_required


def test_logins_find_the_tenant_by_user_name_and_name_only_known_users():
    other = hash_password("b-pass")
    logins = TenantLogins([Tenant("team-a", "a-ci", HASH), Tenant("team-b", "b-ci", other)])
    login = logins.login()
    assert not login.matches("a-ci", "b-pass") and login.accepted is None
    assert login.matches(b"b-ci", b"b-pass")
    assert login.accepted == Accepted("team-b", "b-ci", "b-pass")
    assert "b-pass" not in repr(login.accepted)
    assert not logins.login().matches("nobody", "s3cret")
    assert (login.login_name("a-ci"), login.login_name("nobody"), login.login_name("b-pass")) == ("a-ci", "?", "?")


def test_a_remembered_pair_is_accepted_without_checking_it_again():
    """What the front accepted is passed on to the worker, whose verifier takes it as is (the
    password here is deliberately not the hash's: only remembering can accept it)."""
    logins = TenantLogins([Tenant("team-a", "a-ci", HASH)])
    assert not logins.login().matches("a-ci", "not-the-password")
    logins.remember("a-ci", "not-the-password")
    logins.remember("someone-else", "x")  # not this tenant's user: ignored
    assert logins.login().matches("a-ci", "not-the-password")
    assert not logins.login().matches("someone-else", "x")
