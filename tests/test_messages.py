"""What a newcomer reads when something is off: each message says what happened and what to change."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.zepproc import error_line, run_zep, start_zep, zep_env
from tests.support.ziti import openziti_path, standin_library  # noqa: F401  (fixtures)
from zep import hardening
from zep.cli import build_parser
from zep.config import load_settings

SERVE = ("serve", "--direct", "--socks-port", "0", "--http-port", "0")


def test_dash_dash_version() -> None:
    result = run_zep("--version")
    assert result.returncode == 0
    assert result.stdout.strip().startswith("zep ") and "(ziti-edge-proxy)" in result.stdout


@pytest.mark.parametrize(("env", "args"), [
    ({"ZEP_LOG_LEVEL": "WARNING", "ZEP_FALLBACK": "Deny", "ZEP_EGRESS_DEFAULT": "DENY"}, []),
    ({}, ["--log-level", "Warning", "--fallback", "DENY", "--egress-default", "Deny"]),
])
def test_choices_in_any_case(env: dict[str, str], args: list[str]) -> None:
    flags = vars(build_parser().parse_args(["serve", "--identity", "team.json", *args]))
    settings = load_settings(env, flags)
    assert (settings.log_level, settings.fallback, settings.egress_default) == ("warning", "deny", "deny")
    log_level = [arg for arg in args if arg.lower() == "warning"]
    with start_zep("--direct", *(["--log-level", *log_level] if log_level else []),
                   env={key: value for key, value in env.items() if key == "ZEP_LOG_LEVEL"}) as zp:
        assert zp.stop() == 0
    assert " INFO " not in zp.log_text()  # warning: the ready line and the access lines are info


def test_a_bad_choice_lists_the_words() -> None:
    line = error_line(run_zep(*SERVE, env={"ZEP_LOG_LEVEL": "loud"}))
    assert line == "zep: error: ZEP_LOG_LEVEL must be debug, info, warning or error (in any case), not 'loud'"


def test_a_host_that_does_not_resolve_is_reported_as_such() -> None:
    line = error_line(run_zep(*SERVE, "--host", "no-such-host.invalid"))
    assert line.startswith("zep: error: --host=no-such-host.invalid does not resolve to an address to listen on (")
    assert "reachable from other machines" not in line


def test_a_name_for_loopback_is_loopback() -> None:
    with start_zep("--direct", "--host", "localhost", default_args=False,
                   env={"SOCKS_PORT": "0", "HTTP_PORT": "0"}) as zp:
        assert zp.socks_port


def test_no_auth_switch() -> None:
    with start_zep("--direct", "--no-auth", env={"PROXY_USERNAME": "", "PROXY_PASSWORD": ""}) as zp:
        zp.wait_for_log("authentication off")
    line = error_line(run_zep(*SERVE, "--no-auth", "--password", "secret"))
    assert line == "zep: error: --no-auth and --password are both given: drop one of them"
    line = error_line(run_zep(*SERVE, "--no-auth", "--random-credentials"))
    assert "contradict each other" in line


# ------------------------------------------------------------------ zep version and the SDK


def test_version_without_the_sdk() -> None:
    result = run_zep("version")
    assert result.returncode == 0
    assert "openziti: not installed (pip install 'ziti-edge-proxy[ziti]' to reach Ziti services)" in result.stdout


def test_version_names_the_native_library_it_loads(openziti_path: Path) -> None:
    result = run_zep("version", extra_pythonpath=[str(openziti_path)])
    assert result.returncode == 0, result.stderr
    library = openziti_path / "openziti" / "lib" / "libziti.so"
    assert f"openziti: 1.7.1, native library 1.18.3 (standin) from {library}" in result.stdout


def test_version_when_the_native_library_does_not_load(openziti_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "site"
    (broken / "openziti" / "lib").mkdir(parents=True)
    for module in (openziti_path / "openziti").glob("*.py"):
        (broken / "openziti" / module.name).write_bytes(module.read_bytes())
    (broken / "openziti" / "lib" / "libziti.so").write_bytes(b"not a shared library")
    result = run_zep("version", extra_pythonpath=[str(broken)])
    assert result.returncode == 0, result.stderr
    assert "openziti: installed, but it does not load: cannot load the OpenZiti SDK's native library" in result.stdout


# ------------------------------------------------------------------ non-dumpable


def test_make_undumpable_in_a_real_process() -> None:
    script = ("from zep import hardening\n"
              "before = hardening.is_dumpable()\n"
              "assert hardening.make_undumpable()\n"
              "print(before, hardening.is_dumpable())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["True", "False"], result.stderr
    assert hardening.is_dumpable()  # this process is untouched


def _environ_owner(pid: int) -> int:
    return os.stat(f"/proc/{pid}/environ").st_uid


NOBODY = 65534


def interpreter_for_nobody(env: dict[str, str]) -> str | None:
    """A Python that user `nobody` can run zep with (ours may live under a home directory they cannot enter)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run([candidate, "-c", "import uvloop, zep.cli"], user=NOBODY, group=NOBODY,
                                   extra_groups=[], env=env, cwd="/", capture_output=True, timeout=30)
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start zep as another user (see the next test)")
@pytest.mark.parametrize("dumpable", [False, True])
def test_zep_is_not_dumpable_to_its_own_user_as_root_sees_it(dumpable: bool) -> None:
    """The kernel hands /proc/PID of a non-dumpable process to root: so the same user can no longer
    read zep's environ or mem. Root itself still can, which this test relies on to look."""
    import site

    import zep

    source = str(Path(zep.__file__).resolve().parent.parent)
    env = zep_env(extra_pythonpath=[source, *site.getsitepackages()])
    python = interpreter_for_nobody(env)
    if python is None:
        pytest.skip("no Python interpreter that user nobody may run")
    with tempfile.TemporaryDirectory(prefix="zep-nobody-") as directory:
        os.chmod(directory, 0o777)
        ready = Path(directory, "zep.ready")
        as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "env": env, "cwd": directory}
        control = subprocess.Popen([python, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, **as_nobody)
        switch = ["--dumpable"] if dumpable else []
        zep_proc = subprocess.Popen([python, "-m", "zep", *SERVE, *switch, "--ready-file", str(ready)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **as_nobody)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert zep_proc.poll() is None and time.monotonic() < deadline, zep_proc.stderr.read().decode()
                time.sleep(0.02)
            assert _environ_owner(control.pid) == NOBODY  # an ordinary process of that user
            # zep: only root may look; with --dumpable, zep's own user as well
            assert _environ_owner(zep_proc.pid) == (NOBODY if dumpable else 0)
        finally:
            control.communicate()
            zep_proc.terminate()
            zep_proc.wait(30)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any process's environ")
def test_zep_environ_is_unreadable_to_its_own_user() -> None:
    with start_zep("--direct") as zp:
        with pytest.raises(PermissionError):
            Path(f"/proc/{zp.proc.pid}/environ").read_bytes()
    with start_zep("--direct", env={"ZEP_DUMPABLE": "true"}) as zp:
        assert Path(f"/proc/{zp.proc.pid}/environ").read_bytes()
