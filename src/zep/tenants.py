"""The tenants file (`ZEP_TENANTS`): which teams share one zep, each with its own login and identities.

```toml
[[tenant]]
name = "team-a"                        # letters, digits, '-', '_'; names the tenant in logs and metrics
username = "team-a"                    # the proxy user name (default: the name)
password_hash = "scrypt$14$8$1$..."    # from `zep hash-password`; or:
# password_file = "/run/secrets/team-a-proxy-password"
identities = ["/identities/team-a/*.json"]   # paths and globs, like ZITI_IDENTITIES; or:
# identity_env = "TEAM_A_ZITI_IDENTITY"      # a variable holding the base64 of one identity
fallback = "deny"                      # optional: this tenant's ZEP_FALLBACK
egress = ["allow *.corp.example:443"]  # optional: this tenant's egress rules, before the global ones
```

Everything is checked here, so a mistake stops zep at start with one line that names the file,
the tenant and the key. Nothing read here (hashes, passwords, identities) is ever logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zep.config import FALLBACK_POLICIES, ConfigError, Settings
from zep.egress import EgressPolicy
from zep.passwords import BadHash, Verifier, check_hash_syntax, hash_password, password_from_text

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
FRONT = "front"  # the process that accepts for all tenants; no tenant may take its name
_KEYS = {"name", "username", "password_hash", "password_file", "identities", "identity_env", "fallback", "egress"}


@dataclass(frozen=True)
class Tenant:
    name: str
    username: str
    password_hash: str = field(repr=False)
    identities: tuple[str, ...] = ()  # ZITI_IDENTITIES entries
    identity_env: str | None = None  # name of a variable holding a base64 identity
    fallback: str | None = None  # None: the global ZEP_FALLBACK
    egress: tuple[str, ...] = ()

    def verifier(self) -> Verifier:
        return Verifier(self.username, self.password_hash)

    def worker_settings(self, settings: Settings, environ: Mapping[str, str]) -> Settings:
        """The settings of this tenant's worker: its identities, its fallback (else the global one),
        its egress rules before the global ones, no proxy password (it checks this tenant's hash),
        no tenants file. Raises ConfigError when the tenant needs what the settings lack."""
        fallback = self.fallback or settings.fallback
        if fallback == "proxy" and not settings.upstream_proxy:
            raise ConfigError(f"ZEP_TENANTS: tenant {self.name!r}: fallback proxy needs an upstream proxy: set "
                              "ZEP_UPSTREAM_PROXY or --upstream-proxy")
        identity = environ[self.identity_env] if self.identity_env else None
        return dataclasses.replace(
            settings, tenants=None, ziti_identities=self.identities, ziti_identity=identity, fallback=fallback,
            egress_rules=self.egress + settings.egress_rules, username="", password="", ready_file=None)


@dataclass(frozen=True)
class Tenants:
    path: str
    tenants: tuple[Tenant, ...]

    def by_username(self) -> dict[str, Tenant]:
        return {tenant.username: tenant for tenant in self.tenants}


def front_settings(settings: Settings) -> Settings:
    """The settings of the front: the listeners, no identity ever, no proxy password of its own."""
    return dataclasses.replace(settings, tenants=None, ziti_identities=(), ziti_identity=None, enroll_token=None,
                               enroll_token_file=None, enroll_identity_out=None, username="", password="",
                               ready_file=None)


def load_tenants(path: str, environ: Mapping[str, str] = os.environ) -> Tenants:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"ZEP_TENANTS: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"ZEP_TENANTS: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"ZEP_TENANTS: {path} is not valid TOML: {exc}") from None
    return parse_tenants(document, path, environ)


def parse_tenants(document: Mapping[str, Any], path: str, environ: Mapping[str, str] = os.environ) -> Tenants:
    unknown = set(document) - {"tenant"}
    if unknown:
        raise ConfigError(f"ZEP_TENANTS: {path}: unknown top-level key {sorted(unknown)[0]!r} (expected [[tenant]] tables)")
    tables = document.get("tenant")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"ZEP_TENANTS: {path} defines no tenant (expected [[tenant]] tables)")
    tenants = tuple(_tenant(table, index, path, environ) for index, table in enumerate(tables, 1))
    for attribute in ("name", "username"):
        seen: set[str] = set()
        for tenant in tenants:
            value = getattr(tenant, attribute)
            if value in seen:
                raise ConfigError(f"ZEP_TENANTS: {path}: two tenants have the {attribute} {value!r}")
            seen.add(value)
    return Tenants(path, tenants)


def _tenant(table: Any, index: int, path: str, environ: Mapping[str, str]) -> Tenant:
    where = f"ZEP_TENANTS: {path}: tenant {index}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} is not a table")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name must be 1-63 letters, digits, '-' or '_', starting with a letter or digit")
    if name == FRONT:
        raise ConfigError(f"{where}: the name {FRONT!r} is zep's own (its front process): choose another")
    where = f"ZEP_TENANTS: {path}: tenant {name!r}"
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    username = _string(table, "username", where, default=name)
    password_hash = _password_hash(table, where)
    identities = _strings(table, "identities", where)
    identity_env = _string(table, "identity_env", where, default=None)
    if identities and identity_env:
        raise ConfigError(f"{where}: identities and identity_env are both set: use one")
    if identity_env is not None and not environ.get(identity_env, "").strip():
        raise ConfigError(f"{where}: identity_env names {identity_env}, which is not set")
    fallback = _string(table, "fallback", where, default=None)
    if fallback is not None:
        fallback = fallback.lower()
        if fallback not in FALLBACK_POLICIES:
            raise ConfigError(f"{where}: fallback must be one of {', '.join(FALLBACK_POLICIES)}, not {fallback!r}")
    egress = _strings(table, "egress", where)
    try:
        EgressPolicy.parse(egress)
    except ConfigError as exc:
        raise ConfigError(f"{where}: egress: {exc}") from None
    return Tenant(name, username, password_hash, identities, identity_env, fallback, egress)


def _password_hash(table: dict, where: str) -> str:
    has_hash, has_file = "password_hash" in table, "password_file" in table
    if has_hash == has_file:
        raise ConfigError(f"{where}: set exactly one of password_hash and password_file")
    if has_hash:
        text = _string(table, "password_hash", where)
        try:
            check_hash_syntax(text)
        except BadHash as exc:
            raise ConfigError(f"{where}: password_hash is {exc}") from None
        return text
    file = _string(table, "password_file", where)
    try:
        with open(file, encoding="utf-8", errors="surrogateescape") as f:
            password = password_from_text(f.read())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read password_file {file}: {exc.strerror}") from None
    if not password:
        raise ConfigError(f"{where}: password_file {file} is empty")
    return hash_password(password)


def _string(table: dict, key: str, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: {key} is missing")
        return default
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value.strip()


def _strings(table: dict, key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: {key} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)
