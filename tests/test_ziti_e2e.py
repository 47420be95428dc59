"""End to end through a real `zep serve` with Ziti identities: the real `openziti` package from its
pinned sdist over the stand-in native library, real upstream servers, real clients."""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from tests.support.clients import curl, recv_exactly, socks_session
from tests.support.upstreams import TCPUpstream, Upstream, closed_port
from tests.support.zepproc import ZepProcess, run_zep, start_zep, zep_env
from tests.support.ziti import (  # noqa: F401  (fixtures)
    credentials,
    identity_document,
    openziti_path,
    real_identity_document,
    service,
    standin_library,
    write_identity,
)

SOCKS_NOT_ALLOWED, SOCKS_HOST_UNREACHABLE, SOCKS_TTL_EXPIRED, SOCKS_GENERAL = 0x02, 0x04, 0x06, 0x01


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory, http_a: Upstream, http_b: Upstream, echo: TCPUpstream) -> Path:
    """Two identities (two teams) in one directory, meant to be loaded with a glob."""
    directory = tmp_path_factory.mktemp("identities")
    a, b = f"127.0.0.1:{http_a.port}", f"127.0.0.1:{http_b.port}"
    write_identity(directory / "team-a.json", [
        service("web-a", ["web.example.test", "*.apps.test", "10.20.30.40"], ["80", "8000-8100"], a),
        service("echo", ["echo.test"], ["7"], f"127.0.0.1:{echo.port}"),
        service("flaky", ["flaky.test"], ["80"], a, fail_dial=True, dial_delay_ms=300),
        service("refusing", ["refusing.test"], ["80"], f"127.0.0.1:{closed_port()}", dial_delay_ms=300),
        service("slow", ["slow.test"], ["80"], a, call_delay_ms=4000),
    ])
    write_identity(directory / "team-b.json", [service("web-b", ["b.example.test"], ["80", "443"], b)])
    return directory


@pytest.fixture(scope="module")
def zep_deny(identities: Path, openziti_path: Path) -> Iterator[ZepProcess]:
    """zep with both identities from ZITI_IDENTITIES (a glob), denying whatever Ziti does not carry."""
    with start_zep("--fallback", "deny", "--connect-timeout", "1",
                   env={"ZITI_IDENTITIES": f"{identities}/team-*.json"}, extra_pythonpath=[str(openziti_path)]) as zp:
        yield zp


def socks_proxy(zp: ZepProcess) -> str:
    return f"socks5h://127.0.0.1:{zp.socks_port}"


def http_proxy(zp: ZepProcess) -> str:
    return f"http://127.0.0.1:{zp.http_port}"


def whoami(result) -> str:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["server"]


def access_line(zp: ZepProcess, target: str) -> str:
    return zp.wait_for_log(f"target={target} ")


# ----------------------------------------------------------------------------- routing through Ziti


def test_start_up_log_names_each_identity(zep_deny: ZepProcess, identities: Path) -> None:
    log = zep_deny.log_text()
    for name in ("team-a.json", "team-b.json"):
        assert f"ziti identity loaded: {identities / name} (controller https://controller.standin.test:1280)" in log
    assert "ziti ready: 2 identities" in log
    # Every destination is offered to the identities first: no handshake for the relay engine.
    assert "socks5 handshakes: in Python: every destination is offered to the Ziti identities first" in log
    key_line = credentials()[0].splitlines()[1]  # a line of the private key's base64
    assert key_line not in log


def test_intercept_by_name_with_curl_socks5h(zep_deny: ZepProcess) -> None:
    assert whoami(curl("-x", socks_proxy(zep_deny), "http://web.example.test/whoami")) == "a"
    line = access_line(zep_deny, "web.example.test:80")
    assert "route=ziti:intercept" in line and "outcome=ok" in line


def test_intercept_by_wildcard_with_curl_http_proxy(zep_deny: ZepProcess) -> None:
    result = curl("-x", http_proxy(zep_deny), "http://api.v2.apps.test:8080/whoami")
    assert whoami(result) == "a"
    assert "route=ziti:intercept" in access_line(zep_deny, "http://api.v2.apps.test:8080")


def test_intercept_by_ip_through_connect_tunnel(zep_deny: ZepProcess) -> None:
    result = curl("--proxytunnel", "-x", http_proxy(zep_deny), "http://10.20.30.40:8000/whoami")
    assert whoami(result) == "a"
    assert "route=ziti:intercept" in access_line(zep_deny, "10.20.30.40:8000")


def test_intercept_by_ip_with_socks5_ip_address(zep_deny: ZepProcess) -> None:
    assert whoami(curl("-x", f"socks5://127.0.0.1:{zep_deny.socks_port}", "http://10.20.30.40/whoami")) == "a"


def test_second_identity_with_requests(zep_deny: ZepProcess) -> None:
    proxies = {"http": socks_proxy(zep_deny), "https": socks_proxy(zep_deny)}
    response = requests.get("http://b.example.test/whoami", proxies=proxies, timeout=10)
    assert response.status_code == 200 and response.json()["server"] == "b"


def test_service_by_name_with_httpx(zep_deny: ZepProcess) -> None:
    with httpx.Client(proxy=http_proxy(zep_deny), timeout=10) as client:
        response = client.get("http://web-b.ziti/whoami")
    assert response.status_code == 200 and response.json()["server"] == "b"
    assert "route=ziti:web-b" in access_line(zep_deny, "http://web-b.ziti:80")


def test_service_by_name_with_socks5h(zep_deny: ZepProcess) -> None:
    assert whoami(curl("-x", socks_proxy(zep_deny), "http://web-a.ziti:9999/whoami")) == "a"
    assert "route=ziti:web-a" in access_line(zep_deny, "web-a.ziti:9999")


def test_bytes_both_ways_through_the_bridge(zep_deny: ZepProcess) -> None:
    payload = os.urandom(1 << 20)
    with socks_session(zep_deny.socks_port, "echo.test", 7) as (sock, reply):
        assert reply == 0
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()


# ----------------------------------------------------------------------------- fallback and failures


def test_deny_fallback_socks(zep_deny: ZepProcess, http_a: Upstream) -> None:
    with socks_session(zep_deny.socks_port, "127.0.0.1", http_a.port) as (_sock, reply):
        assert reply == SOCKS_NOT_ALLOWED
    line = access_line(zep_deny, f"127.0.0.1:{http_a.port}")
    assert "route=deny" in line and "outcome=denied" in line


def test_deny_fallback_http(zep_deny: ZepProcess) -> None:
    result = curl("-x", http_proxy(zep_deny), "-o", "/dev/null", "-w", "%{http_code}", "http://not-a-service.test/")
    assert result.stdout == b"403"


def test_unknown_service_name(zep_deny: ZepProcess) -> None:
    with socks_session(zep_deny.socks_port, "nosuch.ziti", 80) as (_sock, reply):
        assert reply == SOCKS_HOST_UNREACHABLE
    result = curl("-x", http_proxy(zep_deny), "-o", "/dev/null", "-w", "%{http_code}", "http://nosuch.ziti/")
    assert result.stdout == b"502"


def test_slow_dial_times_out(zep_deny: ZepProcess) -> None:
    started = time.monotonic()
    with socks_session(zep_deny.socks_port, "slow.test", 80) as (_sock, reply):
        assert reply == SOCKS_TTL_EXPIRED
    assert time.monotonic() - started < 3
    assert "outcome=dial-timeout" in access_line(zep_deny, "slow.test:80")
    result = curl("-x", http_proxy(zep_deny), "-o", "/dev/null", "-w", "%{http_code}", "http://slow.test/")
    assert result.stdout == b"504"


@pytest.mark.parametrize("host", ["flaky.test", "refusing.test"])
def test_dial_failing_after_the_bridge_connect(zep_deny: ZepProcess, host: str) -> None:
    """The SDK connects us to its bridge before the overlay dial completes; the dial then fails."""
    with socks_session(zep_deny.socks_port, "echo.test", 7) as (bystander, reply):
        assert reply == 0
        with socks_session(zep_deny.socks_port, host, 80) as (sock, reply):
            assert reply == 0  # success was already answered when the dial failed
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with pytest.raises(ConnectionResetError):  # the overlay's reset reaches the client as one
                sock.recv(100)
        line = access_line(zep_deny, f"{host}:80")
        assert "route=ziti:intercept" in line and "outcome=ziti-dial-failed" in line
        bystander.sendall(b"still here")  # nobody else's connection is affected
        assert recv_exactly(bystander, 10) == b"still here"


def test_dial_failure_seen_by_curl(zep_deny: ZepProcess) -> None:
    result = curl("-x", socks_proxy(zep_deny), "http://flaky.test/")
    assert result.returncode == 56, result  # receive failure: the connection was reset


def test_direct_fallback(identities: Path, openziti_path: Path, http_a: Upstream) -> None:
    with start_zep("--identity", str(identities / "team-b.json"), extra_pythonpath=[str(openziti_path)]) as zp:
        assert whoami(curl("-x", socks_proxy(zp), f"http://127.0.0.1:{http_a.port}/whoami")) == "a"
        assert "route=direct" in access_line(zp, f"127.0.0.1:{http_a.port}")
        assert whoami(curl("-x", socks_proxy(zp), "http://b.example.test/whoami")) == "b"
        assert "route=ziti:intercept" in access_line(zp, "b.example.test:80")
        assert "anything else: direct" in zp.log_text()


# ----------------------------------------------------------------------------- identities


def test_base64_identity_is_private_while_running_and_removed_at_exit(tmp_path: Path, openziti_path: Path,
                                                                      http_b: Upstream) -> None:
    document = identity_document([service("web-b", ["b.example.test"], ["80"], f"127.0.0.1:{http_b.port}")])
    encoded = base64.b64encode(json.dumps(document).encode()).decode()
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {"ZITI_IDENTITY": encoded, "TMPDIR": str(private_tmp)}
    with start_zep("--fallback", "deny", env=env, extra_pythonpath=[str(openziti_path)]) as zp:
        (decoded,) = private_tmp.glob("zep-ziti-*/identity.json")
        assert stat.S_IMODE(decoded.stat().st_mode) == 0o600
        assert stat.S_IMODE(decoded.parent.stat().st_mode) == 0o700
        assert json.loads(decoded.read_text()) == document
        assert whoami(curl("-x", socks_proxy(zp), "http://b.example.test/whoami")) == "b"
        assert "ziti identity loaded: ZITI_IDENTITY" in zp.log_text()
        assert encoded[:40] not in zp.log_text()
        assert zp.stop() == 0
    assert list(private_tmp.iterdir()) == []


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    (tmp_path / "broken.json").write_text("{ this is not json")
    (tmp_path / "real.json").write_text(json.dumps(real_identity_document()))
    write_identity(tmp_path / "slow.json", load_delay_ms=10000)
    return tmp_path


@pytest.mark.parametrize("args, env, expected", [
    (["--identity", "{dir}/missing.json"], {}, "Ziti identity file {dir}/missing.json does not exist"),
    ([], {"ZITI_IDENTITIES": "{dir}/nothing-*.json"}, "Ziti identity pattern {dir}/nothing-*.json matches no file"),
    ([], {"ZITI_IDENTITY": "this is not base64"}, "ZITI_IDENTITY is not valid base64"),
    ([], {"ZITI_IDENTITIES": "{dir}/broken.json"},
     "Ziti identity {dir}/broken.json: is not JSON (Expecting property name enclosed in double quotes at line 1 column 3)"),
    ([], {"ZITI_IDENTITIES": "{dir}/real.json"}, "cannot load Ziti identity {dir}/real.json: ziti controller is not available"),
    (["--identity", "{dir}/slow.json", "--ziti-load-timeout", "0.5"], {},
     "Ziti identity {dir}/slow.json did not load within 0.5 s"),
])
def test_identity_start_up_errors(bad_inputs: Path, openziti_path: Path, args: list, env: dict, expected: str) -> None:
    fill = {"dir": str(bad_inputs)}
    result = run_zep("serve", "--host", "127.0.0.1", "--socks-port", "0", "--http-port", "0",
                     *(a.format(**fill) for a in args), env={k: v.format(**fill) for k, v in env.items()},
                     extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"zep: error: {expected.format(**fill)}")
    assert len(lines) == 1, lines


def test_without_openziti_the_error_says_how_to_install_it(tmp_path: Path, identities: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()  # whatever is installed, `import openziti` fails as if it were not
    (blocker / "openziti.py").write_text("raise ModuleNotFoundError(\"No module named 'openziti'\", name='openziti')\n")
    result = run_zep("serve", "--identity", str(identities / "team-a.json"), extra_pythonpath=[str(blocker)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "zep: error: a Ziti identity is configured but the OpenZiti SDK is not installed: "
        "pip install 'ziti-edge-proxy[ziti]'"]


LOAD_STARTED_TIMEOUT = 10.0


def wait_for_output(proc: subprocess.Popen, needle: bytes, timeout: float) -> None:
    """Read a process's output until `needle` appears, within `timeout` seconds."""
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while needle not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and proc.poll() is None, f"no {needle!r} within {timeout} s: {seen!r}"
            if sel.select(remaining):
                seen += os.read(proc.stdout.fileno(), 65536)


def test_sigterm_while_loading_removes_the_decoded_identity(tmp_path: Path, openziti_path: Path) -> None:
    encoded = base64.b64encode(json.dumps(identity_document(load_delay_ms=5000)).encode()).decode()
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = zep_env({"ZITI_IDENTITY": encoded, "TMPDIR": str(private_tmp), "ZITI_LOG": "3"}, None,
                  [str(openziti_path)])
    proc = subprocess.Popen([sys.executable, "-m", "zep", "serve", "--host", "127.0.0.1", "--socks-port", "0",
                             "--http-port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # The native library says when it starts loading (at INFO, as the real one does).
        wait_for_output(proc, b"loading identity[", LOAD_STARTED_TIMEOUT)
        assert list(private_tmp.glob("zep-ziti-*/identity.json")), "the identity was never decoded"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert list(private_tmp.iterdir()) == []
