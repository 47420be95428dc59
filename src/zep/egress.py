"""Egress policy: which destinations outside the Ziti overlay zep may reach.

An ordered list of `allow` / `deny` rules; the first rule that matches decides, else the
policy's default. A rule is `ACTION PATTERN[:PORTS]`:

- PATTERN: `*` (anything), a host name (`git.example.com`), a domain wildcard `*.example.com`
  (example.com itself and every name under it, as Ziti intercepts and NO_PROXY read it), or an
  IPv4/IPv6 address or CIDR range (`10.0.0.0/8`, `fd00::/8`; with ports in brackets:
  `[fd00::/8]:443`).
- PORTS: `443`, `443,8443`, `8000-8999` or a mix; none, or `*`, means every port.

Name rules match the host name as the client asked for it (never a reverse lookup). Address
rules match an IP literal the client asked for, and each address a name resolves to: the
direct dialer checks every address after resolution and connects only to addresses that were
allowed, so a name cannot be re-resolved to something else between the check and the connect.
Link-local and cloud metadata addresses are denied unless an address rule allows them: `allow *`
and name rules never open them (a name may resolve to one).

Policies are frozen values built from text, so a tenant can carry its own.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from zep.errors import ConfigError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ACTIONS = ("allow", "deny")
# Reachable from any host, and where clouds serve instance credentials (AWS IMDS on IPv6 too).
PROTECTED_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(text) for text in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"))

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
EXAMPLE = "allow *.example.com:443"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # what decided: 'egress rule 3 "deny 10.0.0.0/8"', "egress default allow", ...


@dataclass(frozen=True)
class EgressRule:
    number: int  # 1-based position in its policy, as messages and access lines name it
    text: str  # as written, whitespace collapsed
    allow: bool
    name: str | None = None  # an exact host name, or a wildcard's domain
    wildcard: bool = False  # `*.domain`: the domain and every name under it
    network: Network | None = None  # an address rule
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty: every port

    @property
    def label(self) -> str:
        return f'egress rule {self.number} "{self.text}"'

    @property
    def by_address(self) -> bool:
        return self.network is not None

    @property
    def matches_any_host(self) -> bool:
        return self.name is None and self.network is None

    def matches_port(self, port: int) -> bool:
        return not self.ports or any(low <= port <= high for low, high in self.ports)

    def matches_name(self, name: str) -> bool:
        if self.name is None:
            return False
        return name == self.name or (self.wildcard and name.endswith("." + self.name))

    def matches_address(self, address: Address) -> bool:
        return self.network is not None and address.version == self.network.version and address in self.network


@dataclass(frozen=True)
class EgressPolicy:
    rules: tuple[EgressRule, ...] = ()
    default_allow: bool = True

    @classmethod
    def parse(cls, rules: Iterable[str], default: str = "allow") -> EgressPolicy:
        """Rules in order; raises ConfigError naming the rule (number and text) at fault."""
        if default not in ACTIONS:
            raise ConfigError(f"the egress default must be allow or deny, not {default!r}")
        return cls(tuple(parse_rule(text, number) for number, text in enumerate(rules, 1)), default == "allow")

    @property
    def open(self) -> bool:
        """No rules and default allow: only the protected addresses are refused."""
        return not self.rules and self.default_allow

    def describe(self) -> str:
        count = len(self.rules)
        return f"{count} egress rule{'' if count == 1 else 's'}, default {'allow' if self.default_allow else 'deny'}"

    def check(self, host: str, port: int, address: Address | None = None) -> Verdict:
        """The verdict for `host` as requested, and the address it resolved to when known.

        With no address and a host name (the upstream-proxy path, where the proxy resolves),
        address rules cannot match and only the name decides.
        """
        name = normalize_name(host)
        address = parse_address(host) if address is None else _unmapped(address)
        protected = protected_network(address) if address is not None else None
        for rule in self.rules:
            if not rule.matches_port(port):
                continue
            if rule.matches_any_host or rule.matches_name(name) or (address is not None and rule.matches_address(address)):
                if rule.allow and protected is not None and not rule.by_address:
                    continue  # `allow *` and name rules never open link-local or metadata addresses
                return Verdict(rule.allow, rule.label)
        if protected is not None:
            return Verdict(False, f"{address} is a link-local or cloud metadata address ({protected}): "
                                  "only an egress rule by address allows it")
        return Verdict(self.default_allow, "egress default " + ("allow" if self.default_allow else "deny"))

    def refuse_early(self, host: str, port: int) -> Verdict | None:
        """A deny that holds for every address `host` could resolve to, decided without touching
        the network; None when the resolved addresses must be checked (see `check`)."""
        if parse_address(host) is not None:
            verdict = self.check(host, port)
            return None if verdict.allowed else verdict
        name = normalize_name(host)
        for rule in self.rules:
            if not rule.matches_port(port):
                continue
            if rule.by_address:
                return None  # an address of this name might match it first
            if rule.matches_any_host or rule.matches_name(name):
                return None if rule.allow else Verdict(False, rule.label)
        return None if self.default_allow else Verdict(False, "egress default deny")


def split_rules(text: str) -> list[str]:
    """`ZEP_EGRESS`: rules separated by `;` or newlines; blank entries are skipped."""
    return [entry.strip() for line in text.splitlines() for entry in line.split(";") if entry.strip()]


def normalize_name(host: str) -> str:
    return host.strip().rstrip(".").lower()


def parse_address(text: str) -> Address | None:
    """An IP literal (a scope id dropped, IPv4-mapped IPv6 read as the IPv4 it maps); else None."""
    try:
        return _unmapped(ipaddress.ip_address(text.partition("%")[0]))
    except ValueError:
        return None


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def protected_network(address: Address) -> Network | None:
    for network in PROTECTED_NETWORKS:
        if address.version == network.version and address in network:
            return network
    return None


def parse_rule(text: str, number: int = 1) -> EgressRule:
    collapsed = " ".join(text.split())

    def error(why: str) -> ConfigError:
        return ConfigError(f'egress rule {number} "{collapsed}": {why}')

    words = collapsed.split(" ") if collapsed else []
    if len(words) != 2:
        raise error(f"a rule is ACTION PATTERN[:PORTS], for example {EXAMPLE}")
    action = words[0].lower()
    if action not in ACTIONS:
        raise error(f"the action must be allow or deny, not {words[0]!r}")
    try:
        pattern, ports_text = _split_ports(words[1])
        ports = _parse_ports(ports_text)
        fields = _parse_pattern(pattern)
    except ValueError as exc:
        raise error(str(exc)) from None
    return EgressRule(number, collapsed, action == "allow", ports=ports, **fields)


def _split_ports(target: str) -> tuple[str, str]:
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("a bracketed address is [ADDRESS] or [ADDRESS]:PORTS")
        return host, rest[1:] if rest else "*"
    if target.count(":") > 1:
        return target, "*"  # an IPv6 address or range without ports
    host, _colon, ports = target.partition(":")
    return host, ports if _colon else "*"


def _parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    if text == "*":
        return ()
    ranges = []
    for item in text.split(","):
        low_text, dash, high_text = item.partition("-")
        if not low_text.isdigit() or (dash and not high_text.isdigit()):
            raise ValueError(f"{item!r} is not a port or a port range (443, 8000-8999)")
        low, high = int(low_text), int(high_text if dash else low_text)
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"{item!r} is not a port range within 1-65535")
        ranges.append((low, high))
    return tuple(ranges)


def _parse_pattern(pattern: str) -> dict:
    if pattern == "*":
        return {}
    if "%" in pattern:
        raise ValueError("an address rule cannot carry a scope id")
    if pattern[:1].isdigit() or ":" in pattern or "/" in pattern:
        try:
            return {"network": ipaddress.ip_network(pattern, strict=True)}
        except ValueError as exc:
            if ":" in pattern or "/" in pattern:
                raise ValueError(f"{pattern!r} is not an IP address or CIDR range ({exc})") from None
    wildcard = pattern.startswith("*.")
    name = normalize_name(pattern[2:] if wildcard else pattern)
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise ValueError(f"{pattern!r} is not a host name, *.domain, IP address or CIDR range")
    return {"name": name, "wildcard": wildcard}
