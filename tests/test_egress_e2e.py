"""Egress rules end to end: `zep serve --direct` with rules, curl through both listeners."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import access_needle, curl, socks_session
from tests.support.upstreams import Upstream, http_upstream
from tests.support.zepproc import ZepProcess, start_zep
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)

CONNECT_AUDIT = str(Path(__file__).parent / "support" / "connect_audit")


@pytest.fixture(scope="module")
def http_c() -> Iterator[Upstream]:
    with http_upstream("c") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def connect_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "connects.log"


@pytest.fixture(scope="module")
def zep_rules(http_a: Upstream, http_b: Upstream, connect_log: Path) -> Iterator[ZepProcess]:
    rules = "\n".join([
        "deny *.blocked.test",
        f"deny *:{http_b.port}",
        f"allow 127.0.0.1:{http_a.port}",
        "deny 127.0.0.0/8",
        "deny ::1",
        "allow *",
    ])
    with start_zep("--direct", "--connect-timeout", "30", env={"ZEP_EGRESS": rules, "ZEP_TEST_CONNECT_LOG": str(connect_log)},
                   extra_pythonpath=[CONNECT_AUDIT]) as zp:
        yield zp


def connects(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def via(zp: ZepProcess, listener: str) -> list[str]:
    return ["--socks5-hostname", f"127.0.0.1:{zp.socks_port}"] if listener == "socks5" else ["-x", f"http://127.0.0.1:{zp.http_port}"]


def curl_socks_reply(result) -> int | None:
    """The SOCKS5 reply code curl 7.x reports on a refused connect: "... connection to HOST. (2)"."""
    text = result.stderr.decode().strip()
    if result.returncode != 97 or not text.endswith(")"):
        return None
    return int(text.rpartition("(")[2].rstrip(")"))


def access_line(zp: ZepProcess, target: str) -> str:
    return zp.wait_for_log(f"target={target} ")


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_allowed_by_address_and_port(zep_rules, http_a, listener):
    result = curl(*via(zep_rules, listener), f"http://127.0.0.1:{http_a.port}/whoami")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"] == "a"


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_a_name_is_dialed_at_the_address_that_was_checked(zep_rules, http_a, connect_log, listener):
    """localhost resolves to 127.0.0.1, which rule 3 allows on this port; rule 5 denies ::1."""
    before = len(connects(connect_log))
    result = curl(*via(zep_rules, listener), f"http://localhost:{http_a.port}/whoami")
    assert result.returncode == 0, result.stderr
    assert connects(connect_log)[before:] == [f"connect 127.0.0.1 {http_a.port}"]


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_denied_by_name_before_any_lookup(zep_rules, listener):
    """The name does not resolve: had zep looked it up, the failure would say so, not name the rule."""
    result = curl(*via(zep_rules, listener), "-w", "%{http_code}", f"http://{listener}.blocked.test/")
    assert curl_socks_reply(result) == 0x02 if listener == "socks5" else result.stdout.endswith(b"403")
    line = zep_rules.wait_for_log(access_needle(listener, f"{listener}.blocked.test:80"))
    assert "route=deny" in line and "outcome=denied" in line and 'egress rule 1 \\"deny *.blocked.test\\"' in line


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_denied_by_port(zep_rules, http_b, connect_log, listener):
    served = len(http_b.requests)  # the upstream serves the whole session: count only this test's
    result = curl(*via(zep_rules, listener), "-w", "%{http_code}", f"http://127.0.0.1:{http_b.port}/whoami")
    if listener == "socks5":
        assert curl_socks_reply(result) == 0x02, result.stderr
    else:
        assert result.stdout.endswith(b"403")
    assert f'egress rule 2 \\"deny *:{http_b.port}\\"' in zep_rules.wait_for_log(f"127.0.0.1:{http_b.port} ")
    assert len(http_b.requests) == served and f"connect 127.0.0.1 {http_b.port}" not in connects(connect_log)


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_denied_by_cidr(zep_rules, http_c, listener):
    tunnel = ["-p", "-w", "%{http_connect}"] if listener == "http" else []
    result = curl(*tunnel, *via(zep_rules, listener), f"http://127.0.0.1:{http_c.port}/whoami")
    assert curl_socks_reply(result) == 0x02 if listener == "socks5" else result.stdout.endswith(b"403")
    line = zep_rules.wait_for_log(access_needle(listener, f"127.0.0.1:{http_c.port}", method="CONNECT"))
    assert 'egress rule 4 \\"deny 127.0.0.0/8\\"' in line
    assert not http_c.requests


def test_a_name_that_resolves_to_a_denied_address_is_denied(zep_rules, http_c):
    with socks_session(zep_rules.socks_port, "localhost", http_c.port) as (_sock, reply):
        assert reply == 0x02
    line = access_line(zep_rules, f"localhost:{http_c.port}")
    assert "outcome=denied" in line and "localhost resolves to" in line
    assert not http_c.requests


@pytest.mark.parametrize("listener", ["socks5", "http"])
def test_metadata_address_denied_before_any_connect(zep_rules, connect_log, listener):
    result = curl(*via(zep_rules, listener), "-w", "%{http_code}", "http://169.254.169.254/latest/meta-data/")
    assert curl_socks_reply(result) == 0x02 if listener == "socks5" else result.stdout.endswith(b"403")
    line = zep_rules.wait_for_log(access_needle(listener, "169.254.169.254:80"))
    assert "outcome=denied" in line and "link-local or cloud metadata" in line
    assert not [entry for entry in connects(connect_log) if "169.254" in entry]


@pytest.mark.parametrize("spelling", ["2852039166", "0xa9.0xfe.0xa9.0xfe", "169.254.43518"])
def test_other_spellings_of_the_metadata_address_are_caught_after_resolution(zep_rules, connect_log, spelling):
    """Not IP literals to zep, but the resolver reads them as 169.254.169.254: the resolved address is checked."""
    with socks_session(zep_rules.socks_port, spelling, 80) as (_sock, reply):
        assert reply == 0x02
    line = access_line(zep_rules, f"{spelling}:80")
    assert "link-local or cloud metadata" in line and f"({spelling} resolves to 169.254.169.254)" in line
    assert not [entry for entry in connects(connect_log) if "169.254" in entry]


def test_metadata_allowed_by_an_explicit_address_rule(http_a, tmp_path):
    """With `allow 169.254.169.254:80`, zep does dial it (the test sandbox stops the connect itself)."""
    log = tmp_path / "connects.log"
    with start_zep("--direct", env={"ZEP_EGRESS": "allow 169.254.169.254:80; allow *", "ZEP_TEST_CONNECT_LOG": str(log)},
                   extra_pythonpath=[CONNECT_AUDIT]) as zp:
        with socks_session(zp.socks_port, "169.254.169.254", 80) as (_sock, reply):
            assert reply == 0x01  # EACCES from the sandbox, not 0x02 from the policy
        line = zp.wait_for_log("target=169.254.169.254:80 ")
        assert "outcome=dial-failed" in line and "route=deny" not in line
        with socks_session(zp.socks_port, "169.254.169.254", 8080) as (_sock, reply):
            assert reply == 0x02  # the address rule names port 80 only
    assert connects(log) == ["connect 169.254.169.254 80"]


def test_ziti_services_are_not_governed_by_the_egress_policy(tmp_path: Path, openziti_path: Path, http_a, http_b):
    """`deny *` stops the fallback route only: a Ziti service is governed by Ziti's own policy."""
    identity = write_identity(tmp_path / "id.json", [service("web-b", ["b.example.test"], ["80"], f"127.0.0.1:{http_b.port}")])
    with start_zep("--identity", str(identity), env={"ZEP_EGRESS": "deny *"}, extra_pythonpath=[str(openziti_path)]) as zp:
        for listener in ("socks5", "http"):
            result = curl(*via(zp, listener), "http://b.example.test/whoami")
            assert result.returncode == 0 and json.loads(result.stdout)["server"] == "b", result.stderr
            denied = curl(*via(zp, listener), "-w", "%{http_code}", f"http://127.0.0.1:{http_a.port}/whoami")
            assert curl_socks_reply(denied) == 0x02 if listener == "socks5" else denied.stdout.endswith(b"403")
        assert "route=ziti:intercept" in zp.wait_for_log("target=b.example.test:80 ")
        assert 'egress rule 1 \\"deny *\\"' in zp.wait_for_log(f"target=127.0.0.1:{http_a.port} ")
