"""Fixtures shared by the end-to-end tests: real upstream servers and a real `zep serve`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.upstreams import TCPUpstream, Upstream, http_upstream, self_signed_context, tcp_upstream
from tests.support.zepproc import ZepProcess, start_zep

RELAYS = ["cython", "python"]
# The SOCKS5 and CONNECT suites run against every driver (tests.support.zepproc.DRIVER_ENVIRONMENT):
# the outcomes must not differ.
DRIVERS = ["native", "fast", "coroutine"]
# The engine's SOCKS5 handshake needs the compiled relay (with the Python relay "native" is the fast
# path again) and changes nothing for HTTP: those combinations are not collected.
NATIVE_NOT_IN = ("tests/test_http_e2e.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        native_moot = params.get("driver") == "native" and (
            params.get("relay_impl") == "python" or item.nodeid.startswith(NATIVE_NOT_IN))
        (dropped if native_moot else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def http_a() -> Iterator[Upstream]:
    with http_upstream("a") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def http_b() -> Iterator[Upstream]:
    with http_upstream("b") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory):
    return self_signed_context(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def https_upstream(tls_files) -> Iterator[Upstream]:
    context, _ca = tls_files
    with http_upstream("tls", "127.0.0.1", tls=context) as upstream:
        yield upstream


@pytest.fixture(scope="session")
def ca_file(tls_files) -> Path:
    return tls_files[1]


@pytest.fixture(scope="session")
def echo() -> Iterator[TCPUpstream]:
    with tcp_upstream("echo") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def half_close() -> Iterator[TCPUpstream]:
    with tcp_upstream("half-close") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def speak_first() -> Iterator[TCPUpstream]:
    with tcp_upstream("speak-first") as upstream:
        yield upstream


@pytest.fixture(scope="module", params=RELAYS)
def relay_impl(request: pytest.FixtureRequest) -> str:
    if request.param == "cython" and os.environ.get("ZEP_NO_EXTENSIONS"):
        pytest.skip("ZEP_NO_EXTENSIONS is set: the compiled relay is deliberately off")
    return request.param


@pytest.fixture(scope="module", params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


def assert_relay(zp: ZepProcess, relay: str) -> None:
    zp.wait_for_log(f"relay={relay}")


@pytest.fixture(scope="module")
def zep(relay_impl: str, driver: str) -> Iterator[ZepProcess]:
    """zep serving both protocols without authentication, dialing directly."""
    with start_zep("--direct", relay=relay_impl, driver=driver) as zp:
        assert_relay(zp, relay_impl)
        yield zp


@pytest.fixture(scope="module")
def zep_auth(relay_impl: str, driver: str) -> Iterator[ZepProcess]:
    """zep requiring the credentials alice / s3cret."""
    with start_zep("--direct", relay=relay_impl, driver=driver, env={"PROXY_USERNAME": "alice", "PROXY_PASSWORD": "s3cret"}) as zp:
        assert_relay(zp, relay_impl)
        yield zp
