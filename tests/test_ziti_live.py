"""Opt-in: through zep into a real OpenZiti network, with the real native library.

    pip install -e '.[ziti,test]'
    ZEP_LIVE_IDENTITY=/path/to/identity.json ZEP_LIVE_TARGET=http://my-service.ziti/ \\
        pytest -m live tests/test_ziti_live.py

ZEP_LIVE_IDENTITY may also hold the base64 of the identity (then it goes in ZITI_IDENTITY).
ZEP_LIVE_EXPECT, if set, is text the target's response must contain.
"""

from __future__ import annotations

import importlib.util
import os
from urllib.parse import urlsplit

import pytest

from tests.support.clients import curl
from tests.support.zepproc import start_zep

pytestmark = pytest.mark.live

IDENTITY = os.environ.get("ZEP_LIVE_IDENTITY", "")
TARGET = os.environ.get("ZEP_LIVE_TARGET", "")
EXPECT = os.environ.get("ZEP_LIVE_EXPECT", "")


@pytest.fixture(scope="module")
def live_zep():
    if not IDENTITY or not TARGET:
        pytest.skip("set ZEP_LIVE_IDENTITY and ZEP_LIVE_TARGET to run against a real OpenZiti network")
    if importlib.util.find_spec("openziti") is None:
        pytest.skip("the live test needs the real SDK: pip install 'ziti-edge-proxy[ziti]'")
    env = {"ZITI_IDENTITIES": IDENTITY} if os.path.exists(IDENTITY) else {"ZITI_IDENTITY": IDENTITY}
    with start_zep("--fallback", "deny", env=env) as zp:
        yield zp


@pytest.mark.parametrize("proxy", ["socks5h", "http"])
def test_curl_reaches_the_service(live_zep, proxy: str) -> None:
    port = live_zep.socks_port if proxy == "socks5h" else live_zep.http_port
    result = curl("--fail", "--max-time", "60", "-x", f"{proxy}://127.0.0.1:{port}", TARGET)
    assert result.returncode == 0, result.stderr.decode(errors="replace") + live_zep.log_text()
    if EXPECT:
        assert EXPECT in result.stdout.decode(errors="replace")
    host = urlsplit(TARGET).hostname
    line = live_zep.wait_for_log(f"target={host}:")
    assert "route=ziti:" in line and "outcome=ok" in line, line


def test_other_destinations_are_denied(live_zep) -> None:
    result = curl("-x", f"http://127.0.0.1:{live_zep.http_port}", "-o", "/dev/null", "-w", "%{http_code}",
                  "http://zep-live-test.invalid/")
    assert result.stdout == b"403"
