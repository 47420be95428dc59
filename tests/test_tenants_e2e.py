"""Tenants end to end: a real `zep serve --tenants` (a supervisor, a front, one worker per tenant)
with stand-in identities under the real `openziti` package, real upstreams and real clients.

Both tenants' identities intercept the same name, `svc.test:80`, with different services whose
targets answer with their own name: a connection carried by the wrong identity would show at
once. Team A logs in with a hash made by `zep hash-password` and its identity is a file; team B
logs in with a password file and its identity is base64 in a variable (identity_env).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import curl, read_socks_reply, recv_exactly, socks_connect_request, socks_session
from tests.support.processes import gone, wait_until
from tests.support.upstreams import TCPUpstream, Upstream, http_upstream, payload
from tests.support.zepproc import ZepProcess, run_zep, start_zep, zep_env
from zep.passwords import hash_password
from tests.support.ziti import identity_document, openziti_path, service, standin_library, write_identity  # noqa: F401

WAIT = 30.0
A = ("team-a", "a-pass", "service-a")  # user name, password, the name its service answers with
B = ("b-ci", "b-pass", "service-b")
IDENTITY_VARIABLE = "TEAM_B_ZITI_IDENTITY"
SOCKS_GENERAL_FAILURE = 0x01


@pytest.fixture(scope="module")
def service_a() -> Iterator[Upstream]:
    with http_upstream("service-a") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def service_b() -> Iterator[Upstream]:
    with http_upstream("service-b") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def tenants_setup(tmp_path_factory: pytest.TempPathFactory, service_a: Upstream, service_b: Upstream,
                  echo: TCPUpstream) -> tuple[Path, dict[str, str]]:
    """The tenants file and the environment that carries team B's identity."""
    directory = tmp_path_factory.mktemp("tenants")
    write_identity(directory / "team-a.json", [
        service("svc-a", ["svc.test"], ["80"], service_a.authority),
        service("echo-a", ["echo.test"], ["7"], f"127.0.0.1:{echo.port}"),
    ])
    team_b = identity_document([
        service("svc-b", ["svc.test"], ["80"], service_b.authority),
        service("echo-b", ["echo.test"], ["7"], f"127.0.0.1:{echo.port}"),
    ])
    hashed = subprocess.run([sys.executable, "-m", "zep", "hash-password"], input=A[1] + "\n", env=zep_env(),
                            capture_output=True, text=True, timeout=WAIT, check=True).stdout.strip()
    password_file = directory / "b-password"
    password_file.write_text(B[1] + "\n")
    path = directory / "tenants.toml"
    path.write_text(f"""
[[tenant]]
name = "team-a"
password_hash = "{hashed}"
identities = ["{directory}/team-a*.json"]
fallback = "deny"

[[tenant]]
name = "team-b"
username = "{B[0]}"
password_file = "{password_file}"
identity_env = "{IDENTITY_VARIABLE}"
fallback = "deny"
""")
    encoded = base64.b64encode(json.dumps(team_b).encode()).decode()
    return path, {IDENTITY_VARIABLE: encoded}


def start_tenants(tenants_setup, openziti_path: Path, relay: str | None = None):
    path, env = tenants_setup
    return start_zep("--tenants", str(path), "--connect-timeout", "2", "--dumpable", env=env, relay=relay,
                     extra_pythonpath=[str(openziti_path)])


@pytest.fixture(scope="module", params=["compiled", "python"])
def zep_tenants(request, tenants_setup, openziti_path: Path) -> Iterator[ZepProcess]:
    """Both relays: ZEP_NO_EXTENSIONS=1 reaches the workers, which relay."""
    with start_tenants(tenants_setup, openziti_path, "python" if request.param == "python" else None) as zp:
        yield zp


def pids(zp: ZepProcess) -> dict[str, int]:
    return {w["id"]: w["pid"] for w in zp.ready_info()["workers"]}


def whoami(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["server"]


def through_socks(zp: ZepProcess, user: str, password: str, url: str = "http://svc.test/whoami"):
    return curl("--proxy", f"socks5h://{user}:{password}@127.0.0.1:{zp.socks_port}", url)


def through_http(zp: ZepProcess, user: str, password: str, *extra: str, url: str = "http://svc.test/whoami"):
    return curl("--proxy", f"http://127.0.0.1:{zp.http_port}", "--proxy-user", f"{user}:{password}", *extra, url)


# ----------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("tenant", [A, B], ids=["team-a", "team-b"])
def test_each_tenant_reaches_its_own_service_over_every_listener(zep_tenants: ZepProcess, tenant) -> None:
    user, password, name = tenant
    for _ in range(3):
        assert whoami(through_socks(zep_tenants, user, password)) == name
        assert whoami(through_http(zep_tenants, user, password)) == name  # forwarded
        assert whoami(through_http(zep_tenants, user, password, "--proxytunnel")) == name  # CONNECT
    team = "team-a" if tenant is A else "team-b"
    line = zep_tenants.wait_for_log(f"user={user} ")
    assert f"tenant={team} " in line and "route=ziti:" in line
    assert f"worker={team} " in line  # logged by the tenant's worker, never by the front


def test_the_front_logs_nothing_for_a_handed_off_connection(zep_tenants: ZepProcess) -> None:
    assert whoami(through_socks(zep_tenants, *A[:2])) == "service-a"
    zep_tenants.wait_for_log("tenant=team-a ")
    assert not [line for line in zep_tenants.access_lines() if "worker=front " in line and "outcome=ok" in line]


@pytest.mark.parametrize("credentials", [("team-a", "b-pass"), ("b-ci", "a-pass"), ("nobody", "a-pass")])
def test_a_wrong_tenant_password_is_refused(zep_tenants: ZepProcess, credentials) -> None:
    user, password = credentials
    with socket.create_connection(("127.0.0.1", zep_tenants.socks_port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
        assert recv_exactly(sock, 2) == b"\x01\x01"
    result = through_http(zep_tenants, user, password, "--write-out", "%{http_code}", "--output", "/dev/null")
    assert result.stdout == b"407"
    shown = user if user in ("team-a", "b-ci") else "?"  # a user name no tenant has is not logged
    # the first line of this kind (later failures from the same address are folded by the throttle)
    line = zep_tenants.wait_for_log(f"route=- user={shown} up=")
    assert "worker=front " in line and "outcome=auth-failed" in line
    assert "user=nobody" not in zep_tenants.log_text() and password not in zep_tenants.log_text()


def test_another_tenant_s_login_on_a_kept_alive_connection_gets_407_and_a_close(zep_tenants: ZepProcess) -> None:
    def request(user: str, password: str) -> bytes:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return (f"GET http://svc.test/whoami HTTP/1.1\r\nHost: svc.test\r\n"
                f"Proxy-Authorization: Basic {token}\r\n\r\n").encode()

    with socket.create_connection(("127.0.0.1", zep_tenants.http_port), timeout=10) as sock:
        sock.sendall(request(*A[:2]))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, body = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
        body += recv_exactly(sock, length - len(body))
        assert json.loads(body)["server"] == "service-a"
        sock.sendall(request(*B[:2]))  # the same connection, now as team B
        rest = b""
        while chunk := sock.recv(65536):  # until zep closes it
            rest += chunk
        assert rest.startswith(b"HTTP/1.1 407 ")
        assert b"service-b" not in rest  # closed without reaching team B's service


def test_the_front_never_maps_the_ziti_library_and_identities_stay_out_of_environments(
        zep_tenants: ZepProcess, tenants_setup) -> None:
    running = pids(zep_tenants)
    assert set(running) == {"front", "team-a", "team-b"}

    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "libziti" not in maps(running["front"])
    for team in ("team-a", "team-b"):
        assert "libziti.so" in maps(running[team])  # the same check finds it where it is loaded
    encoded = tenants_setup[1][IDENTITY_VARIABLE].encode()
    assert encoded not in Path(f"/proc/{zep_tenants.proc.pid}/cmdline").read_bytes()
    for pid in running.values():  # team B's identity reached its worker in the hello only
        assert encoded not in Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert IDENTITY_VARIABLE.encode() not in environ and encoded not in environ


# ----------------------------------------------------------------------------- a worker dies


def echo_round(sock: socket.socket, size: int, seed: int) -> None:
    data = payload(size, seed)
    sock.sendall(data)
    assert hashlib.sha256(recv_exactly(sock, size)).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_killed_worker_leaves_the_other_tenant_alone_and_comes_back(tenants_setup, openziti_path: Path) -> None:
    """Team B's tunnel keeps going while team A's worker is killed. The supervisor is held stopped
    meanwhile, so that team A's worker stays down long enough to see what its clients get (SOCKS
    0x01, HTTP 503, a log line); let go, it restarts the worker, which is ready again and serves."""
    with start_tenants(tenants_setup, openziti_path) as zp:
        before = pids(zp)
        with socks_session(zp.socks_port, "echo.test", 7, credentials=B[:2]) as (tunnel, reply):
            assert reply == 0
            echo_round(tunnel, 256 * 1024, 1)
            zp.proc.send_signal(signal.SIGSTOP)
            try:
                os.kill(before["team-a"], signal.SIGKILL)
                wait_until(lambda: gone(before["team-a"]), "team-a's worker to die", WAIT)
                echo_round(tunnel, 1024 * 1024, 2)  # team B's transfer is intact
                with socket.create_connection(("127.0.0.1", zp.socks_port), timeout=10) as sock:
                    user, password = (part.encode() for part in A[:2])
                    sock.sendall(b"\x05\x01\x02" + b"\x01" + bytes([len(user)]) + user + bytes([len(password)])
                                 + password + socks_connect_request("svc.test", 80))
                    assert recv_exactly(sock, 4) == b"\x05\x02\x01\x00"
                    assert read_socks_reply(sock)[0] == SOCKS_GENERAL_FAILURE
                result = through_http(zp, *A[:2], "--write-out", "%{http_code}", "--output", "/dev/null")
                assert result.stdout == b"503"
                assert whoami(through_socks(zp, *B[:2])) == "service-b"  # team B's new clients too
                line = zp.wait_for_log("tenant team-a: refusing a connection from")
                assert "worker=front " in line
            finally:
                zp.proc.send_signal(signal.SIGCONT)
            zp.wait_for_log(f"worker team-a (pid {before['team-a']}) killed by SIGKILL")
            after = wait_until(lambda: (p := pids(zp))["team-a"] != before["team-a"] and p, "team-a ready again", WAIT)
            assert after["team-b"] == before["team-b"] and after["front"] == before["front"]
            assert whoami(through_socks(zp, *A[:2])) == "service-a"
            assert whoami(through_http(zp, *A[:2])) == "service-a"
            echo_round(tunnel, 64 * 1024, 3)


# ----------------------------------------------------------------------------- start-up refusals


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("zep: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_bad_tenants_file_stops_zep_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[[tenant]]\nname = "team-a"\npassword_hash = "plain"\n')
    line = one_error_line(run_zep("serve", "--tenants", str(path)))
    assert f"ZEP_TENANTS: {path}: tenant 'team-a': password_hash is not a zep password hash" in line
    path.write_text('[[tenant]]\nname = "team-a"\npassword_file = "/nonexistent/pw"\nfallback = "proxy"\n')
    assert "cannot read password_file /nonexistent/pw" in one_error_line(run_zep("serve", "--tenants", str(path)))
    assert "ZEP_TENANTS is for zep serve" in one_error_line(run_zep("run", "--tenants", str(path), "--", "true"))


def test_a_tenant_whose_identity_cannot_load_stops_zep_with_its_reason(tmp_path: Path, openziti_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    missing = tmp_path / "missing.json"
    hashed = hash_password("x")
    path.write_text(f'[[tenant]]\nname = "team-a"\npassword_hash = "{hashed}"\nidentities = ["{missing}"]\n')
    result = run_zep("serve", "--tenants", str(path), "--socks-port", "0", "--http-port", "0",
                     extra_pythonpath=[str(openziti_path)], timeout=60)
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and "zep: error: " in result.stderr




def test_each_tenant_s_egress_rules_and_fallback_apply_in_its_own_worker(tmp_path: Path, openziti_path: Path,
                                                                         service_a: Upstream) -> None:
    """Outside Ziti: team A's own rule denies the destination (403, the rule named in its access
    line), team B's fallback dials it directly, and a global rule comes after each tenant's own."""
    hashed = hash_password("pw")
    path = tmp_path / "tenants.toml"
    path.write_text(f"""
[[tenant]]
name = "team-a"
password_hash = "{hashed}"
fallback = "direct"
egress = ["deny 127.0.0.1/32:{service_a.port}"]

[[tenant]]
name = "team-b"
password_hash = "{hashed}"
fallback = "direct"
""")
    url = f"http://{service_a.authority}/whoami"
    with start_zep("--tenants", str(path), "--egress", "allow 127.0.0.0/8", "--egress-default", "deny",
                   extra_pythonpath=[str(openziti_path)]) as zp:
        denied = through_http(zp, "team-a", "pw", "--write-out", "%{http_code}", "--output", "/dev/null", url=url)
        assert denied.stdout == b"403"
        line = zp.wait_for_log("tenant=team-a ")
        assert f'detail="egress rule 1 \\"deny 127.0.0.1/32:{service_a.port}\\""' in line
        assert "route=deny" in line and "outcome=denied" in line
        assert whoami(through_http(zp, "team-b", "pw", url=url)) == "service-a"  # global "allow 127.0.0.0/8"
        assert "route=direct" in zp.wait_for_log("tenant=team-b ")
        blocked = through_socks(zp, "team-b", "pw", url="http://192.0.2.1/")  # the global default: deny
        assert blocked.returncode != 0
        line = zp.wait_for_log("proto=socks5 tenant=team-b ")
        assert "outcome=denied" in line and "egress default deny" in line


def test_metrics_name_each_tenant(tenants_setup, openziti_path: Path) -> None:
    """The supervisor's /metrics merges every process's series, labelled by process: a tenant's
    worker is named after its tenant, so each tenant's exchanges are counted under its name."""
    from tests.test_admin import scrape, value

    path, env = tenants_setup
    with start_zep("--tenants", str(path), "--connect-timeout", "2", "--dumpable", "--admin", "127.0.0.1:0",
                   env=env, extra_pythonpath=[str(openziti_path)]) as zp:
        assert whoami(through_socks(zp, A[0], A[1])) == A[2]
        for _ in range(2):
            assert whoami(through_socks(zp, B[0], B[1])) == B[2]
        zp.wait_for_lines(" zep.access: ", 3)
        samples = scrape(zp)
    for tenant, count in (("team-a", 1), ("team-b", 2)):
        assert value(samples, "zep_exchanges_total", proto="socks5", route_kind="ziti", outcome="ok",
                     worker=tenant) == count
    front = [v for (name, labels), v in samples.items()
             if name == "zep_exchanges_total" and dict(labels).get("worker") == "front"]
    assert sum(front) == 0  # the front hands its connections over: the tenants' workers count them
