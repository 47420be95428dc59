"""`zep run -- CMD` and `zep env` through real processes: real zep, real curl, real shells, and
the Ziti stand-in for two teams' identities on one host."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.upstreams import Upstream, http_upstream
from tests.support.zepproc import READY_TIMEOUT, run_zep, start_zep, zep_env
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)

JOB_TIMEOUT = 60.0
LINE_TIMEOUT = 30.0
CURL = "curl --silent --show-error --fail --max-time 20"


def zep_run(*args: str, command: Sequence[str], env: dict[str, str] | None = None,
            pythonpath: Sequence[str] = (), stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen:
    """Start `zep run ARGS -- COMMAND` with its output on pipes."""
    return subprocess.Popen([sys.executable, "-m", "zep", "run", *args, "--", *command],
                            env=zep_env(env, None, pythonpath), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"zep run did not finish within {timeout} s:\n{out}\n{err}") from None
    return proc.returncode, out, err


def read_line(proc: subprocess.Popen, timeout: float = LINE_TIMEOUT) -> str:
    """The next line CMD writes to stdout, within `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from the command within {timeout} s")
    return proc.stdout.readline().strip()


# ------------------------------------------------------------------ exit status and signals


@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0),
    ("exit 7", 7),
    ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL),
])
def test_exit_status_of_the_command_is_zeps(script: str, status: int) -> None:
    code, _out, err = finish(zep_run("--direct", command=["sh", "-c", script]))
    assert code == status, err


def test_a_command_that_does_not_exist_exits_127() -> None:
    code, _out, err = finish(zep_run("--direct", command=["no-such-command-for-zep"]))
    assert code == 127
    assert "zep: error: cannot run no-such-command-for-zep: command not found" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_to_zep_reach_the_command(signum: int) -> None:
    script = ("import signal, sys\n"
              "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))\n"
              "signal.signal(signal.SIGINT, lambda *_: sys.exit(41))\n"
              "print('waiting', flush=True)\n"
              "signal.pause()\n")
    proc = zep_run("--direct", command=[sys.executable, "-c", script])
    assert read_line(proc) == "waiting"
    proc.send_signal(signum)
    code, _out, err = finish(proc)
    assert code == (42 if signum == signal.SIGTERM else 41), err


def test_sigterm_to_zep_ends_a_command_without_a_handler_with_143() -> None:
    proc = zep_run("--direct", command=[sys.executable, "-c", "import signal; print('waiting', flush=True); signal.pause()"])
    assert read_line(proc) == "waiting"
    proc.send_signal(signal.SIGTERM)
    code, _out, err = finish(proc)
    assert code == 143, err


def test_run_needs_the_command_after_double_dash() -> None:
    result = run_zep("run", "--direct", "true")
    assert result.returncode == 2
    assert "zep run needs the command after --" in result.stderr


# ------------------------------------------------------------------ the environment CMD gets


def test_command_gets_every_proxy_variable_and_not_the_identity(team_identities: dict[str, Path],
                                                                 openziti_path: Path) -> None:
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    identity = base64.b64encode(team_identities["a"].read_bytes()).decode()
    code, out, err = finish(zep_run("--no-proxy", "svc.internal, .corp.example", "--no-proxy", "db",
                                    command=[sys.executable, "-c", script], pythonpath=[str(openziti_path)],
                                    env={"ZITI_IDENTITY": identity, "https_proxy": "http://elsewhere:3128"}))
    assert code == 0, err
    env = json.loads(out)
    socks, http = env["ALL_PROXY"], env["HTTP_PROXY"]
    assert socks.startswith("socks5h://zep-") and "@127.0.0.1:" in socks
    assert http.startswith("http://zep-") and "@127.0.0.1:" in http
    assert env["HTTPS_PROXY"] == http and env["https_proxy"] == http and env["http_proxy"] == http
    assert env["all_proxy"] == socks
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1,svc.internal,.corp.example,db"
    assert "ZITI_IDENTITY" not in env
    # The same credentials on both listeners, different ports, none of the defaults.
    assert socks.split("//")[1].split("@")[0] == http.split("//")[1].split("@")[0]
    assert "user:password" not in socks


def test_the_command_is_an_ordinary_dumpable_process() -> None:
    """zep is non-dumpable; what it starts is not (exec resets the flag), so debuggers and core dumps work."""
    script = "from zep import hardening; print(hardening.is_dumpable())"
    code, out, err = finish(zep_run("--direct", command=[sys.executable, "-c", script]))
    assert code == 0, err
    assert out.strip() == "True"


def test_run_help_is_argparse_help() -> None:
    result = run_zep("run", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: zep run [serve options] -- CMD [ARGS...]")


def test_explicit_credentials_and_no_auth() -> None:
    script = "import os; print(os.environ['ALL_PROXY'])"
    code, out, err = finish(zep_run("--direct", "--username", "ci", "--password", "p@ss word",
                                    command=[sys.executable, "-c", script]))
    assert code == 0, err
    assert out.startswith("socks5h://ci:p%40ss%20word@127.0.0.1:")
    code, out, err = finish(zep_run("--direct", "--no-auth", command=[sys.executable, "-c", script]))
    assert code == 0, err
    assert out.startswith("socks5h://127.0.0.1:")


def test_secrets_are_on_no_command_line_and_in_no_log(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    script = ("import os, sys\n"
              "password = os.environ['ALL_PROXY'].split('@')[0].rsplit(':', 1)[1]\n"
              "hits = []\n"
              "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
              "    try:\n"
              "        if password.encode() in open(f'/proc/{pid}/cmdline', 'rb').read(): hits.append(pid)\n"
              "    except OSError: pass\n"
              "print(password); print(len(hits))\n")
    code, out, err = finish(zep_run("--direct", "--log-level", "debug", "--ready-file", str(ready),
                                    command=[sys.executable, "-c", script]))
    assert code == 0, err
    password, hits = out.split()
    assert len(password) >= 24 and hits == "0"
    assert password not in err
    assert not ready.exists()


def test_ready_file_of_a_run_is_private_and_removed(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    script = f"import os, stat; print(oct(stat.S_IMODE(os.stat({str(ready)!r}).st_mode)))"
    code, out, err = finish(zep_run("--direct", "--ready-file", str(ready), command=[sys.executable, "-c", script]))
    assert code == 0, err
    assert out.strip() == "0o600"
    assert not ready.exists()


# ------------------------------------------------------------------ two teams on one host


@pytest.fixture(scope="module")
def team_servers() -> Iterator[dict[str, Upstream]]:
    """Each team's own server (this module's, so no other test sees their requests)."""
    with http_upstream("a") as a, http_upstream("b") as b:
        yield {"a": a, "b": b}


@pytest.fixture(scope="module")
def team_identities(tmp_path_factory: pytest.TempPathFactory, team_servers: dict[str, Upstream]) -> dict[str, Path]:
    """Team A's and team B's identities: the same service address, each team's own server behind it."""
    directory = tmp_path_factory.mktemp("teams")
    return {team: write_identity(directory / f"{team}.json", [
        service(f"web-{team}", ["web.team.test"], ["80"], f"127.0.0.1:{server.port}")]) for team, server in team_servers.items()}


def test_two_concurrent_jobs_each_reach_their_own_service_and_not_the_others_proxy(
        team_identities: dict[str, Path], openziti_path: Path, tmp_path: Path) -> None:
    pythonpath = [str(openziti_path)]
    ready_a = tmp_path / "a.ready"
    # Job A fetches through its proxy, then waits (on stdin) while job B runs.
    job_a = zep_run("--identity", str(team_identities["a"]), "--fallback", "deny", "--log-level", "info",
                    "--ready-file", str(ready_a),
                    command=["sh", "-c", f"{CURL} http://web.team.test/whoami; echo; read _ || true"],
                    pythonpath=pythonpath, stdin=subprocess.PIPE)
    try:
        assert json.loads(read_line(job_a))["server"] == "a"
        a = json.loads(ready_a.read_text())
        # Job B, with its own credentials, first uses its own proxy, then tries A's on both ports.
        script = (
            'creds=${ALL_PROXY#socks5h://}; creds=${creds%@*}\n'
            f'{CURL} http://web.team.test/whoami; echo\n'
            f'{CURL} -x "socks5h://$creds@{a["socks5"]}" http://web.team.test/whoami; echo "socks=$?"\n'
            f'{CURL} -o /dev/null -w "%{{http_code}}" -x "http://$creds@{a["http"]}" http://web.team.test/whoami;'
            ' echo " http=$?"\n'
        )
        code, out, err = finish(zep_run("--identity", str(team_identities["b"]), "--fallback", "deny",
                                        command=["sh", "-c", script], pythonpath=pythonpath))
        assert code == 0, err
        lines = out.splitlines()
        assert json.loads(lines[0])["server"] == "b"
        assert lines[1] == "socks=97"  # curl: the SOCKS5 proxy refused the credentials
        assert lines[2] == "407 http=22"
    except BaseException:
        job_a.kill()
        raise
    code, _out, err_a = finish(job_a)  # closes A's stdin: its command ends
    assert code == 0, err_a
    assert err_a.count("outcome=auth-failed") == 2
    assert "route=ziti:intercept" in err_a
    assert not ready_a.exists()


def test_summary_counts_routes_and_lists_what_failed(team_identities: dict[str, Path], openziti_path: Path) -> None:
    script = (f"{CURL} -o /dev/null http://web.team.test/whoami;"
              f"{CURL} -o /dev/null http://web.team.test/whoami;"
              f"{CURL} -o /dev/null http://not-a-service.test/ ;"
              f"{CURL} -o /dev/null --socks5-hostname \"${{ALL_PROXY#socks5h://}}\" http://other.test:8443/ ;"
              "exit 3")
    code, _out, err = finish(zep_run("--identity", str(team_identities["a"]), "--fallback", "deny",
                                     command=["sh", "-c", script], pythonpath=[str(openziti_path)]))
    assert code == 3
    summary = err[err.index("zep: 4 connections through the proxy"):]
    assert summary.splitlines()[1].split() == ["route", "connections", "sent", "received"]
    assert any(line.split()[:2] == ["ziti:intercept", "2"] for line in summary.splitlines())
    assert any(line.split()[:2] == ["deny", "2"] for line in summary.splitlines())
    assert "zep: 2 destinations denied or failed:" in summary
    assert "  http://not-a-service.test:80 denied" in summary  # a forwarded request, named as its access line does
    assert "  other.test:8443 denied" in summary
    assert len(summary.splitlines()) <= 24


# ------------------------------------------------------------------ zep env


@pytest.fixture()
def zep_random(team_identities: dict[str, Path], openziti_path: Path) -> Iterator:
    with start_zep("--identity", str(team_identities["a"]), "--fallback", "deny", "--random-credentials",
                   "--no-proxy", "cache.internal", extra_pythonpath=[str(openziti_path)]) as zp:
        yield zp


def test_env_output_sourced_by_sh_gives_a_working_curl(zep_random, tmp_path: Path) -> None:
    ready = zep_random.ready_path
    assert stat.S_IMODE(ready.stat().st_mode) == 0o600
    exports = run_zep("env", "--ready-file", str(ready))
    assert exports.returncode == 0, exports.stderr
    (tmp_path / "proxy.sh").write_text(exports.stdout)
    script = (f". {tmp_path / 'proxy.sh'}\n"
              f"{CURL} http://web.team.test/whoami && echo\n"
              f'{CURL} -x "$ALL_PROXY" http://web.team.test/whoami && echo\n'
              'echo "$NO_PROXY"\n')
    result = subprocess.run(["sh", "-c", script], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stderr
    first, second, no_proxy = result.stdout.splitlines()
    assert json.loads(first)["server"] == json.loads(second)["server"] == "a"
    assert no_proxy == "localhost,127.0.0.1,::1,cache.internal"
    user = json.loads(ready.read_text())["username"]
    assert user.startswith("zep-")
    assert zep_random.wait_for_log(f"user={user} ") and zep_random.wait_for_log("proto=socks5 target=web.team.test:80")


@pytest.mark.parametrize("form", ["github", "dotenv", "json"])
def test_env_formats_hold_the_same_variables(zep_random, form: str) -> None:
    sh = run_zep("env", "--ready-file", str(zep_random.ready_path))
    other = run_zep("env", "--format", form.upper(), "--ready-file", str(zep_random.ready_path),
                    env={"ZEP_NO_PROXY": "extra.test"})
    assert sh.returncode == other.returncode == 0, other.stderr
    expected = {line.removeprefix("export ").split("=", 1)[0]: line.split("=", 1)[1].strip("'")
                for line in sh.stdout.splitlines()}
    expected["NO_PROXY"] = expected["no_proxy"] = expected["NO_PROXY"] + ",extra.test"
    if form == "json":
        assert json.loads(other.stdout) == expected
    else:
        assert dict(line.split("=", 1) for line in other.stdout.splitlines()) == expected
    assert set(expected) == {"ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                             "NO_PROXY", "no_proxy"}


def test_env_from_zep_ready_file_variable_and_after_zep_stopped(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    with start_zep("--direct", "--no-auth", ready_path=ready) as zp:
        result = run_zep("env", "--format", "json", env={"ZEP_READY_FILE": str(ready)})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["ALL_PROXY"] == f"socks5h://127.0.0.1:{zp.socks_port}"
    assert not ready.exists()
    gone = run_zep("env", "--ready-file", str(ready))
    assert gone.returncode == 2
    assert gone.stderr.strip() == (f"zep: error: no ready file at {ready} (ZEP_READY_FILE/--ready-file): "
                                   f"is `zep serve --ready-file {ready}` running?")


def test_env_wait_gives_up_when_the_background_zep_exits(tmp_path: Path) -> None:
    failing = subprocess.Popen([sys.executable, "-m", "zep", "serve"], env=zep_env(),  # no identity: exits 2
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = run_zep("env", "--ready-file", str(tmp_path / "r"), "--wait", str(READY_TIMEOUT),
                         "--pid", str(failing.pid))
    finally:
        failing.wait(JOB_TIMEOUT)
    assert result.returncode == 2
    assert f"zep (pid {failing.pid}) exited before it was ready" in result.stderr


def test_env_wait_returns_once_zep_is_ready(tmp_path: Path) -> None:
    ready = tmp_path / "zep.ready"
    proc = subprocess.Popen([sys.executable, "-m", "zep", "serve", "--direct", "--random-credentials",
                             "--socks-port", "0", "--http-port", "0", "--ready-file", str(ready)],
                            env=zep_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = run_zep("env", "--ready-file", str(ready), "--wait", str(READY_TIMEOUT), "--pid", str(proc.pid))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("export ALL_PROXY=socks5h://zep-")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(JOB_TIMEOUT) == 0
    assert not ready.exists()


def test_env_wait_never_takes_another_zeps_ready_file(tmp_path: Path) -> None:
    """Job B's zep finds job A's live ready file and refuses to start; B's zep env must say so,
    not hand B the variables of A's proxy."""
    ready = tmp_path / "shared.ready"
    with start_zep("--direct", ready_path=ready):
        second = subprocess.Popen([sys.executable, "-m", "zep", "serve", "--direct", "--socks-port", "0",
                                   "--http-port", "0", "--ready-file", str(ready)],
                                  env=zep_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = run_zep("env", "--ready-file", str(ready), "--wait", str(READY_TIMEOUT), "--pid", str(second.pid))
        finally:
            assert second.wait(JOB_TIMEOUT) == 2
    assert result.returncode == 2 and result.stdout == ""
    assert f"zep (pid {second.pid}) exited before it was ready" in result.stderr
