"""The egress rule parser and matcher: rule syntax, first match wins, protected addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zep.egress import EgressPolicy, parse_rule, split_rules
from zep.errors import ConfigError


def policy(*rules: str, default: str = "allow") -> EgressPolicy:
    return EgressPolicy.parse(rules, default)


def decide(p: EgressPolicy, host: str, port: int, address: str | None = None) -> tuple[bool, str]:
    verdict = p.check(host, port, ipaddress.ip_address(address) if address else None)
    return verdict.allowed, verdict.reason


@pytest.mark.parametrize(("text", "expected"), [
    ("allow *", dict(allow=True, name=None, network=None, ports=())),
    ("deny example.com", dict(allow=False, name="example.com", wildcard=False)),
    ("ALLOW Git.Example.COM.", dict(allow=True, name="git.example.com")),
    ("allow *.corp.example:443,8443", dict(name="corp.example", wildcard=True, ports=((443, 443), (8443, 8443)))),
    ("deny 10.0.0.0/8", dict(allow=False, network=ipaddress.ip_network("10.0.0.0/8"), ports=())),
    ("allow 169.254.169.254:80", dict(network=ipaddress.ip_network("169.254.169.254/32"), ports=((80, 80),))),
    ("deny fd00::/8", dict(network=ipaddress.ip_network("fd00::/8"), ports=())),
    ("allow [2001:db8::/32]:443,8000-8999", dict(network=ipaddress.ip_network("2001:db8::/32"),
                                                 ports=((443, 443), (8000, 8999)))),
    ("allow [::1]", dict(network=ipaddress.ip_network("::1/128"), ports=())),
    ("deny *:25", dict(name=None, network=None, ports=((25, 25),))),
    ("allow  1password.com:*", dict(name="1password.com", ports=())),
])
def test_rule_syntax(text, expected):
    rule = parse_rule(text)
    for name, value in expected.items():
        assert getattr(rule, name) == value, name


@pytest.mark.parametrize(("text", "why"), [
    ("allow", "ACTION PATTERN"),
    ("allow a b", "ACTION PATTERN"),
    ("permit *", "must be allow or deny"),
    ("allow foo:0", "within 1-65535"),
    ("allow foo:70000", "within 1-65535"),
    ("allow foo:9-1", "within 1-65535"),
    ("allow foo:http", "not a port"),
    ("allow foo:", "not a port"),
    ("deny 10.1.2.3/8", "host bits set"),
    ("deny 10.0.0.0/33", "not an IP address or CIDR range"),
    ("deny fe80::1%eth0", "scope id"),
    ("allow foo*.com", "not a host name"),
    ("allow *.", "not a host name"),
    ("allow [::1", "bracketed"),
    ("allow [::1]443", "bracketed"),
])
def test_bad_rules_name_the_rule(text, why):
    with pytest.raises(ConfigError) as caught:
        EgressPolicy.parse(["allow *", text])
    message = str(caught.value)
    assert message.startswith(f'egress rule 2 "{" ".join(text.split())}": ') and why in message


def test_bad_default():
    with pytest.raises(ConfigError, match="allow or deny"):
        EgressPolicy.parse([], "maybe")


def test_split_rules_on_semicolons_and_newlines():
    assert split_rules("allow a.example ; deny 10.0.0.0/8\n\n allow *;") == ["allow a.example", "deny 10.0.0.0/8", "allow *"]


def test_first_match_wins_and_names_the_rule():
    p = policy("allow *.corp.example:443,8443", "deny 10.0.0.0/8", "deny *.corp.example", "allow *")
    assert decide(p, "git.corp.example", 443) == (True, 'egress rule 1 "allow *.corp.example:443,8443"')
    assert decide(p, "git.corp.example", 22) == (False, 'egress rule 3 "deny *.corp.example"')
    assert decide(p, "10.1.2.3", 443) == (False, 'egress rule 2 "deny 10.0.0.0/8"')
    assert decide(p, "example.org", 80) == (True, 'egress rule 4 "allow *"')


def test_wildcard_matches_the_apex_and_subdomains_only():
    p = policy("deny *.example.com", default="allow")
    assert not decide(p, "example.com", 443)[0]
    assert not decide(p, "a.b.EXAMPLE.com.", 443)[0]
    assert decide(p, "notexample.com", 443)[0]
    assert decide(p, "example.com.evil", 443)[0]
    exact = policy("deny example.com")
    assert not decide(exact, "example.com", 1)[0] and decide(exact, "www.example.com", 1)[0]


def test_port_ranges():
    p = policy("allow *:8000-8999,443", default="deny")
    assert [decide(p, "h", port)[0] for port in (443, 7999, 8000, 8500, 8999, 9000)] == [True, False, True, True, True, False]
    assert decide(p, "h", 80) == (False, "egress default deny")


def test_address_rules_match_resolved_addresses_after_the_name():
    p = policy("allow *.corp.example", "deny 10.0.0.0/8", "allow *")
    assert decide(p, "git.corp.example", 443, "10.0.0.5")[0]  # the name rule comes first
    assert decide(p, "intranet.other", 443, "10.0.0.5") == (False, 'egress rule 2 "deny 10.0.0.0/8"')
    assert decide(p, "intranet.other", 443, "192.0.2.1")[0]
    # Without an address (the upstream proxy resolves), only names decide.
    assert decide(p, "intranet.other", 443) == (True, 'egress rule 3 "allow *"')


def test_ipv4_mapped_addresses_are_their_ipv4():
    p = policy("deny 10.0.0.0/8")
    assert not decide(p, "::ffff:10.1.1.1", 80)[0]
    assert decide(p, "x.example", 80, "::ffff:10.1.1.1") == (False, 'egress rule 1 "deny 10.0.0.0/8"')


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%eth0",
                                     "fd00:ec2::254", "::ffff:169.254.169.254"])
def test_metadata_and_link_local_need_an_address_rule(address):
    for p in (policy(), policy("allow *"), policy("allow *:80"), policy("allow metadata.google.internal")):
        allowed, reason = decide(p, address, 80)
        assert not allowed and "link-local or cloud metadata" in reason
    resolved = decide(policy("allow metadata.google.internal"), "metadata.google.internal", 80,
                      address.partition("%")[0].replace("::ffff:", ""))
    assert not resolved[0]
    opened = policy("allow *", "allow 169.254.169.254", "allow fe80::/10", "allow fd00:ec2::254")
    expected = address.endswith("169.254.169.254") or ":" in address
    assert decide(opened, address, 80)[0] is expected


def test_deny_star_still_denies_metadata():
    assert decide(policy("deny *"), "169.254.169.254", 80) == (False, 'egress rule 1 "deny *"')


def test_refuse_early_only_when_no_address_could_change_the_answer():
    p = policy("deny *.blocked.example", "deny 10.0.0.0/8", "deny other.example", "allow *")
    assert p.refuse_early("x.blocked.example", 443).reason == 'egress rule 1 "deny *.blocked.example"'
    assert p.refuse_early("other.example", 443) is None  # a resolved 10.x address would match rule 2 first
    assert p.refuse_early("10.9.9.9", 443).reason == 'egress rule 2 "deny 10.0.0.0/8"'
    assert p.refuse_early("169.254.169.254", 80).allowed is False
    assert p.refuse_early("ok.example", 443) is None
    assert policy(default="deny").refuse_early("anything.example", 1).reason == "egress default deny"
    assert policy("allow 10.0.0.0/8", default="deny").refuse_early("anything.example", 1) is None


_ACTIONS = st.sampled_from(["allow", "deny", "DENY", "permit", ""])
_PATTERNS = st.sampled_from(["*", "*.example.com", "example.com", "10.0.0.0/8", "10.1.2.3/8", "192.0.2.7", "[::1]",
                             "fd00::/8", "[fd00::/8]", "fe80::1%eth0", "foo*.com", "a..b", "*.", "[::1", "::"]) | st.text(
    "abcxyz019.-*_/:[]", max_size=14)
_PORTS = st.sampled_from(["", ":443", ":443,8443", ":80,8000-8999", ":*", ":0", ":70000", ":9-1", ":", ":a"]) | st.text(
    "0123456789,-*", max_size=8).map(":".__add__)
_RULE_TEXT = st.builds("{}{}{}{}".format, _ACTIONS, st.sampled_from([" ", "  ", "\t", ""]), _PATTERNS, _PORTS)


@settings(max_examples=200, deadline=None)
@given(_RULE_TEXT | st.text(max_size=30))
def test_any_rule_text_parses_or_names_itself(text):
    try:
        rule = parse_rule(text, 7)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f'egress rule 7 "{" ".join(text.split())}": ') and "\n" not in message
        return
    assert rule.text == " ".join(text.split()) and parse_rule(rule.text, 7) == rule  # its text reads back the same
    policy_ = EgressPolicy((rule,))
    for host in ("example.com", "10.0.0.1", "::1", "169.254.169.254"):
        policy_.check(host, 443)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["allow *", "deny *", "allow 169.254.0.0/16", "deny *.x.test", "allow *.x.test:443",
                                 "deny 10.0.0.0/8", "allow 10.1.0.0/16"]), max_size=6),
       st.sampled_from(["a.x.test", "x.test", "y.test"]), st.sampled_from(["10.1.2.3", "10.2.0.1", "169.254.1.1", "192.0.2.9"]),
       st.sampled_from([80, 443]))
def test_an_early_refusal_agrees_with_every_address(rules, host, address, port):
    p = EgressPolicy.parse(rules, "allow")
    early = p.refuse_early(host, port)
    if early is not None:
        assert not p.check(host, port, ipaddress.ip_address(address)).allowed
