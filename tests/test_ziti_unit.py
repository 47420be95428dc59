"""zep.ziti in-process: identity configuration, error mapping, and the dialer on the real `openziti`
package running over the stand-in native library (tests/ziti_standin)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.upstreams import TCPUpstream, closed_port, tcp_upstream
from tests.support.ziti import (  # noqa: F401  (fixtures)
    ZITI_AUTHENTICATION_FAILED,
    identity_document,
    openziti_path,
    real_identity_document,
    sdk_on_path,
    service,
    standin_library,
    write_identity,
)
from zep import ziti
from zep.config import Settings
from zep.dial import DialError, Failure

# ----------------------------------------------------------------------------- configuration pieces


def test_expand_plain_files_and_globs_sorted_and_each_once(tmp_path: Path) -> None:
    for name in ("b.json", "a.json", "c.txt"):
        (tmp_path / name).write_text("{}")
    entries = [str(tmp_path / "*.json"), str(tmp_path / "a.json"), str(tmp_path / "c.txt")]
    assert ziti.expand_identity_entries(entries) == [str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                                      str(tmp_path / "c.txt")]


def test_expand_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ziti.ZitiSetupError, match=r"Ziti identity file .*missing\.json does not exist"):
        ziti.expand_identity_entries([str(tmp_path / "missing.json")])


def test_expand_glob_matching_nothing_names_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()  # a directory matching the pattern is not an identity
    with pytest.raises(ziti.ZitiSetupError, match=r"pattern .*\*\.json matches no file"):
        ziti.expand_identity_entries([str(tmp_path / "*.json"), str(tmp_path / "s*")])


def test_expand_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ziti.ZitiSetupError, match="is not a file"):
        ziti.expand_identity_entries([str(tmp_path)])


def test_decode_identity_accepts_wrapped_base64() -> None:
    document = identity_document()
    encoded = base64.encodebytes(json.dumps(document).encode()).decode()  # 76-column lines
    assert "\n" in encoded.strip()
    assert json.loads(ziti.decode_identity(encoded)) == document


def test_decode_identity_accepts_the_json_itself() -> None:
    document = identity_document()
    assert json.loads(ziti.decode_identity("\n  " + json.dumps(document, indent=2) + "\n")) == document


@pytest.mark.parametrize("text, message", [
    ("not base64!", "not valid base64"),
    ('{"unterminated": ', "starts like JSON but is not an identity JSON document"),
    ("abc", "not valid base64"),  # bad padding
    (base64.b64encode(b"\xff\xfe binary").decode(), "does not decode to an identity JSON"),
    (base64.b64encode(b"[1, 2]").decode(), "does not decode to an identity JSON"),
])
def test_decode_identity_rejects(text: str, message: str) -> None:
    with pytest.raises(ziti.ZitiSetupError, match=message) as caught:
        ziti.decode_identity(text)
    assert "ZITI_IDENTITY" in str(caught.value)


def test_private_directory_modes_and_removal() -> None:
    private = ziti.PrivateDirectory()
    path = private.write("identity.json", b"{}")
    assert stat.S_IMODE(os.stat(private.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    private.remove()
    assert not os.path.exists(private.path)


@pytest.mark.parametrize("suffix, host, expected", [
    (".ziti", "web.ziti", "web"),
    (".ziti", "Web.ZITI", "Web"),
    (".ziti", "web.ziti.", "web"),
    (".ziti", "db.prod.ziti", "db.prod"),
    (".ziti", ".ziti", None),
    (".ziti", "web.example.com", None),
    ("ziti", "web.ziti", "web"),
    ("", "web.ziti", None),
])
def test_service_for_host(suffix: str, host: str, expected: str | None) -> None:
    assert ziti.service_for_host(host, ziti.normalize_suffix(suffix)) == expected


def test_ziti_error_code_only_for_sdk_errors() -> None:
    assert ziti.ziti_error_code(Exception(-18, "service not available")) == -18
    assert ziti.ziti_error_code(OSError(111, "refused")) is None
    assert ziti.ziti_error_code(Exception("x", "y")) is None
    assert ziti.ziti_error_code(ValueError(-18, "x")) is None


def test_start_without_identities_is_an_error() -> None:
    with pytest.raises(ziti.ZitiSetupError, match="no Ziti identity"):
        ziti.start(Settings())


# ----------------------------------------------------------------------------- on the SDK + stand-in


@pytest.fixture
def echo_server() -> Iterator[TCPUpstream]:
    with tcp_upstream("echo") as upstream:
        yield upstream


@pytest.fixture
def dialers(sdk_on_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Start dialers with `ziti.start(...)`; each is closed afterwards, which also unloads its identities."""
    monkeypatch.delenv("ZITI_IDENTITIES", raising=False)
    monkeypatch.delenv("ZITI_IDENTITY", raising=False)
    started: list[ziti.ZitiDialer] = []
    yield started
    for dialer in started:
        dialer.close()


def start(dialers: list, **settings) -> ziti.ZitiDialer:
    dialer = ziti.start(Settings(**settings))
    dialers.append(dialer)
    return dialer


def run(coro):
    return asyncio.run(coro)


async def echo_through(dialer: ziti.ZitiDialer, host: str, port: int, data: bytes = b"ping") -> tuple[str, bytes]:
    upstream = await dialer.dial(host, port, 5.0)
    assert upstream is not None, f"{host}:{port} was not routed through Ziti"
    assert upstream.sock.getblocking() is False
    reader, writer = await asyncio.open_connection(sock=upstream.sock)
    writer.write(data)
    answer = await asyncio.wait_for(reader.readexactly(len(data)), 5)
    writer.close()
    return upstream.route, answer


@pytest.fixture
def web_identity(tmp_path: Path, echo_server: TCPUpstream) -> Path:
    target = f"127.0.0.1:{echo_server.port}"
    return write_identity(tmp_path / "web.json", [
        service("web", ["web.example.test", "*.corp.test", "10.9.8.7", "10.1.2.0/24"], ["80", "8000-8100"], target),
        service("admin", ["admin.corp.test"], ["443"], target),
    ])


@pytest.mark.parametrize("host, port", [
    ("web.example.test", 80),
    ("WEB.example.test", 8000),
    ("api.corp.test", 8100),
    ("deep.api.corp.test", 80),
    ("corp.test", 80),
    ("10.9.8.7", 80),
    ("10.1.2.200", 8050),
])
def test_dial_by_intercept(dialers: list, web_identity: Path, host: str, port: int) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))
    assert run(echo_through(dialer, host, port)) == (ziti.INTERCEPT_ROUTE, b"ping")


@pytest.mark.parametrize("host, port", [
    ("web.example.test", 81),
    ("web.example.test", 8101),
    ("other.example.test", 80),
    ("corp.test.evil", 80),
    ("10.1.3.1", 80),
    ("web", 80),
])
def test_no_intercept_returns_none(dialers: list, web_identity: Path, host: str, port: int) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))
    assert run(dialer.dial(host, port, 5.0)) is None


def test_dial_by_service_name(dialers: list, web_identity: Path) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))
    assert run(echo_through(dialer, "admin.ziti", 1)) == ("ziti:admin", b"ping")


def test_unknown_service_name_is_host_unreachable(dialers: list, web_identity: Path) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))
    with pytest.raises(DialError) as caught:
        run(dialer.dial("nosuch.ziti", 443, 5.0))
    assert caught.value.failure is Failure.HOST_UNREACHABLE
    assert "nosuch" in caught.value.detail


def test_suffix_can_be_changed_or_turned_off(dialers: list, web_identity: Path) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),), ziti_service_suffix=".svc.internal")
    assert run(echo_through(dialer, "admin.svc.internal", 1))[0] == "ziti:admin"
    assert run(dialer.dial("admin.ziti", 1, 5.0)) is None
    dialer.close()
    dialer = start(dialers, ziti_identities=(str(web_identity),), ziti_service_suffix="")
    assert run(dialer.dial("admin.ziti", 1, 5.0)) is None


def test_two_identities_each_with_their_services(dialers: list, tmp_path: Path) -> None:
    with tcp_upstream("echo") as one, tcp_upstream("half-close") as two:
        a = write_identity(tmp_path / "ids" / "team-a.json", [service("a-svc", ["a.test"], ["80"], f"127.0.0.1:{one.port}")])
        write_identity(tmp_path / "ids" / "team-b.json", [service("b-svc", ["b.test"], ["80"], f"127.0.0.1:{two.port}")])
        dialer = start(dialers, ziti_identities=(str(tmp_path / "ids" / "*.json"), str(a)))
        assert [i.label for i in dialer.identities] == [str(a), str(tmp_path / "ids" / "team-b.json")]

        async def digest_through(host: str, port: int) -> tuple[str, bytes]:
            """The half-close server answers with the sha256 of what it got, once it sees our EOF."""
            upstream = await dialer.dial(host, port, 5.0)
            reader, writer = await asyncio.open_connection(sock=upstream.sock)
            writer.write(b"to b")
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return upstream.route, answer

        async def scenario() -> None:
            digest = hashlib.sha256(b"to b").hexdigest().encode()
            assert await echo_through(dialer, "a.test", 80) == (ziti.INTERCEPT_ROUTE, b"ping")
            assert await digest_through("b.test", 80) == (ziti.INTERCEPT_ROUTE, digest)
            assert await echo_through(dialer, "a-svc.ziti", 1) == ("ziti:a-svc", b"ping")
            assert await digest_through("b-svc.ziti", 1) == ("ziti:b-svc", digest)
            assert await dialer.dial("c.test", 80, 5.0) is None

        run(scenario())


async def expect_reset(upstream) -> None:
    reader, writer = await asyncio.open_connection(sock=upstream.sock)
    with pytest.raises(ConnectionResetError):
        writer.write(b"hello")
        await asyncio.wait_for(reader.read(10), 5)
    writer.close()


def test_dial_failing_after_the_bridge_connect_is_a_reset(dialers: list, tmp_path: Path, echo_server: TCPUpstream) -> None:
    path = write_identity(tmp_path / "id.json", [service("flaky", ["flaky.test"], ["80"], f"127.0.0.1:{echo_server.port}",
                                                          fail_dial=True, dial_delay_ms=300)])
    dialer = start(dialers, ziti_identities=(str(path),))

    async def scenario() -> None:
        upstream = await dialer.dial("flaky.test", 80, 5.0)
        assert upstream is not None and upstream.route == ziti.INTERCEPT_ROUTE  # connected to the bridge first
        await expect_reset(upstream)

    run(scenario())


@pytest.mark.parametrize("switches", [{"fail_dial": True}, {"target_closed": True}])
def test_dial_failing_at_once_is_a_dial_error_or_a_reset(dialers: list, tmp_path: Path, echo_server: TCPUpstream,
                                                         switches: dict) -> None:
    """A failure that is already known when the bridge connect completes becomes a DialError; one
    that comes a moment later is a reset of the connected socket. Which one depends on timing."""
    port = closed_port() if switches.pop("target_closed", False) else echo_server.port
    path = write_identity(tmp_path / "id.json", [service("down", ["down.test"], ["80"], f"127.0.0.1:{port}", **switches)])
    dialer = start(dialers, ziti_identities=(str(path),))

    async def scenario() -> None:
        try:
            upstream = await dialer.dial("down.test", 80, 5.0)
        except DialError as exc:
            assert exc.failure is Failure.GENERAL
            assert "overlay dial failed" in exc.detail
        else:
            await expect_reset(upstream)

    for _ in range(5):
        run(scenario())


def test_target_refusing_after_a_slow_dial_is_a_reset(dialers: list, tmp_path: Path) -> None:
    path = write_identity(tmp_path / "id.json", [service("down", ["down.test"], ["80"], f"127.0.0.1:{closed_port()}",
                                                          dial_delay_ms=300)])
    dialer = start(dialers, ziti_identities=(str(path),))

    async def scenario() -> None:
        upstream = await dialer.dial("down.test", 80, 5.0)
        await expect_reset(upstream)

    run(scenario())


def test_slow_sdk_call_times_out_without_blocking_the_loop(dialers: list, tmp_path: Path, echo_server: TCPUpstream) -> None:
    path = write_identity(tmp_path / "id.json", [
        service("slow", ["slow.test"], ["80"], f"127.0.0.1:{echo_server.port}", call_delay_ms=1500),
        service("fast", ["fast.test"], ["80"], f"127.0.0.1:{echo_server.port}"),
    ])
    dialer = start(dialers, ziti_identities=(str(path),))

    async def scenario() -> None:
        started = time.monotonic()
        slow = asyncio.ensure_future(dialer.dial("slow.test", 80, 0.3))
        # Meanwhile the loop serves others: a fast dial completes while the slow one waits.
        assert (await echo_through(dialer, "fast.test", 80))[1] == b"ping"
        assert not slow.done()
        with pytest.raises(DialError) as caught:
            await slow
        assert caught.value.failure is Failure.TIMEOUT
        assert 0.25 < time.monotonic() - started < 1.2

    run(scenario())


def test_slow_overlay_dial_connects_first_and_delivers_later(dialers: list, tmp_path: Path, echo_server: TCPUpstream) -> None:
    path = write_identity(tmp_path / "id.json", [service("late", ["late.test"], ["80"], f"127.0.0.1:{echo_server.port}",
                                                          dial_delay_ms=400)])
    dialer = start(dialers, ziti_identities=(str(path),))

    async def scenario() -> None:
        started = time.monotonic()
        upstream = await dialer.dial("late.test", 80, 0.2)  # the bridge connect does not wait for the dial
        assert time.monotonic() - started < 0.2
        reader, writer = await asyncio.open_connection(sock=upstream.sock)
        writer.write(b"early bytes wait in the bridge")
        assert await asyncio.wait_for(reader.readexactly(30), 5) == b"early bytes wait in the bridge"
        assert time.monotonic() - started >= 0.35
        writer.close()

    run(scenario())


def test_identity_variables_leave_the_environment(dialers: list, web_identity: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZITI_IDENTITIES", str(web_identity))
    start(dialers, ziti_identities=(str(web_identity),))
    assert "ZITI_IDENTITIES" not in os.environ


def test_base64_identity_is_a_private_file_until_close(dialers: list, tmp_path: Path, echo_server: TCPUpstream) -> None:
    document = identity_document([service("b64", ["b64.test"], ["80"], f"127.0.0.1:{echo_server.port}")])
    dialer = start(dialers, ziti_identity=base64.b64encode(json.dumps(document).encode()).decode())
    (identity,) = dialer.identities
    assert identity.label == "ZITI_IDENTITY"
    assert stat.S_IMODE(os.stat(identity.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(identity.path)).st_mode) == 0o700
    assert not identity.path.startswith(os.getcwd())
    assert run(echo_through(dialer, "b64.test", 80))[1] == b"ping"
    dialer.close()
    assert not os.path.exists(os.path.dirname(identity.path))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text(json.dumps(real_identity_document())), "controller is not available"),
    (lambda p: write_identity(p, load_error=ZITI_AUTHENTICATION_FAILED), "failed to authenticate"),
])
def test_identity_that_fails_to_load(dialers: list, tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.json"
    make(path)
    with pytest.raises(ziti.ZitiSetupError, match=message) as caught:
        start(dialers, ziti_identities=(str(path),))
    assert str(path) in str(caught.value)


def test_failed_start_unloads_what_it_loaded(dialers: list, tmp_path: Path, web_identity: Path) -> None:
    bad = write_identity(tmp_path / "z-bad.json", load_error=ZITI_AUTHENTICATION_FAILED)
    with pytest.raises(ziti.ZitiSetupError):
        start(dialers, ziti_identities=(str(web_identity), str(bad)))
    dialer = start(dialers, ziti_identities=(str(web_identity),))  # loading it again works: it was unloaded
    assert len(dialer.identities) == 1


def test_load_timeout_bounds_the_wait(dialers: list, tmp_path: Path) -> None:
    slow = write_identity(tmp_path / "slow.json", load_delay_ms=5000)
    started = time.monotonic()
    with pytest.raises(ziti.ZitiSetupError, match=r"did not load within 0.3 s") as caught:
        start(dialers, ziti_identities=(str(slow),), ziti_load_timeout=0.3)
    assert time.monotonic() - started < 2
    assert "ZEP_ZITI_LOAD_TIMEOUT" in str(caught.value)


def test_dial_after_close_is_a_general_failure(dialers: list, web_identity: Path) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))
    dialer.close()
    dialer.close()
    with pytest.raises(DialError) as caught:
        run(dialer.dial("web.example.test", 80, 1.0))
    assert caught.value.failure is Failure.GENERAL


def test_many_concurrent_dials(dialers: list, web_identity: Path) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))

    async def scenario() -> None:
        results = await asyncio.gather(*(echo_through(dialer, f"h{i}.corp.test", 80, f"msg {i}".encode())
                                         for i in range(40)))
        assert [answer for _, answer in results] == [f"msg {i}".encode() for i in range(40)]

    run(scenario())


def test_socket_handed_over_is_connected_to_loopback(dialers: list, web_identity: Path) -> None:
    dialer = start(dialers, ziti_identities=(str(web_identity),))

    async def scenario() -> None:
        upstream = await dialer.dial("web.example.test", 80, 5.0)
        try:
            assert upstream.sock.type == socket.SOCK_STREAM
            assert upstream.sock.getpeername()[0] == "127.0.0.1"
        finally:
            upstream.sock.close()

    run(scenario())
