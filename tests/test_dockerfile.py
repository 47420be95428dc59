"""The container image cannot be built here, so check what can be checked without Docker: the
Dockerfile parses, copies files that exist and that .dockerignore lets through, runs without root,
keeps the original variables working, refuses to start with default or no credentials (its CMD run
with its ENV), and its HEALTHCHECK command really tells a live zep from a dead one."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.zepproc import start_zep, zep_env
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)
from zep.config import ENVIRONMENT, SECRET_FILES, ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """`--from=build a b` -> ({"from": "build"}, ["a", "b"]); exec (JSON) form is decoded."""
        words = shlex.split(self.value)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words

    def exec_form(self) -> list[str] | None:
        text = self.value
        if self.keyword == "HEALTHCHECK":
            text = text.split("CMD", 1)[1] if "CMD" in text else ""
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """A small parser for the subset a plain Dockerfile uses: comments, line continuations, stages."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, value = logical.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip(), start)
        logical = ""
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.value.partition("=")
            args[name] = default
        else:
            assert stages, f"line {start}: {instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    assert not logical, "the Dockerfile ends inside a continued line"
    return args, stages


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory match covers its contents."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        pattern = pattern.rstrip("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        regex_pattern = pattern.replace("**/", "*")  # fnmatch's * already crosses '/'
        if any(fnmatch.fnmatchcase(prefix, regex_pattern) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def final(dockerfile) -> Stage:
    return dockerfile[1][-1]


def test_the_first_line_selects_the_dockerfile_frontend() -> None:
    # Needed for RUN --mount and HEALTHCHECK --start-interval on every builder, not only recent ones.
    assert (ROOT / "Dockerfile").read_text().splitlines()[0] == "# syntax=docker/dockerfile:1"


def test_multi_stage_with_a_slim_python_final_image(dockerfile) -> None:
    args, stages = dockerfile
    assert len(stages) >= 2
    assert stages[0].name == "build"
    base = final(dockerfile).base.replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", ""))
    assert base.startswith("python:3.") and "-slim" in base
    assert tuple(int(x) for x in args["PYTHON_VERSION"].split(".")) >= (3, 11)


def test_copied_sources_exist_and_reach_the_build_context(dockerfile, ignore_patterns: list[str]) -> None:
    stage_names = {stage.name for stage in dockerfile[1] if stage.name}
    copied = 0
    for stage in dockerfile[1]:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, words = instruction.flags_and_args()
            sources = words[:-1]
            if "from" in flags:
                assert flags["from"] in stage_names, f"line {instruction.line}: unknown stage {flags['from']}"
                continue
            for source in sources:
                matches = list(ROOT.glob(source))
                assert matches, f"line {instruction.line}: COPY source {source} does not exist"
                for match in matches:
                    relative = match.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(relative, ignore_patterns), f"{relative} is in .dockerignore"
                    copied += 1
    assert copied >= 4


def test_dockerignore_keeps_the_context_small(ignore_patterns: list[str]) -> None:
    for path in (".git/config", "tests/conftest.py", "benchmarks/report.py", "build/lib/zep/x.py",
                 "src/zep/__pycache__/cli.cpython-311.pyc", "src/zep/_relay.c", "src/zep/_relay.cpython-311-x86_64-linux-gnu.so"):
        assert dockerignore_excludes(path, ignore_patterns), path
    for path in ("pyproject.toml", "setup.py", "README.md", "src/zep/cli.py", "src/zep/_relay.pyx",
                 "src/zep/includes/system.pxd"):
        assert not dockerignore_excludes(path, ignore_patterns), path


def test_build_stage_builds_the_compiled_relay_and_the_ziti_extra(dockerfile) -> None:
    build = dockerfile[1][0]
    runs = " ".join(i.value for i in build.all("RUN"))
    assert "pip wheel" in runs and '".[ziti]"' in runs and "zep/_relay" in runs
    assert "gcc" in runs


def test_final_stage_installs_the_wheel_with_the_ziti_extra_and_no_compiler(dockerfile) -> None:
    runs = " ".join(i.value for i in final(dockerfile).all("RUN"))
    assert "--no-index" in runs and "ziti-edge-proxy[ziti]" in runs
    assert "gcc" not in runs and "apt-get install" not in runs


def test_wheels_reach_the_final_stage_through_a_bind_mount_not_a_layer(dockerfile) -> None:
    stage = final(dockerfile)
    assert not [i for i in stage.all("COPY") + stage.all("ADD") if "from" in i.flags_and_args()[0]]
    (install,) = [i for i in stage.all("RUN") if "pip install" in i.value]
    flags, words = install.flags_and_args()
    mount = dict(part.split("=", 1) for part in flags["mount"].split(","))
    assert mount == {"type": "bind", "from": "build", "source": "/wheels", "target": "/wheels"}
    assert f"--find-links {mount['target']}" in " ".join(words)
    build = dockerfile[1][0]
    assert any("--wheel-dir /wheels" in i.value for i in build.all("RUN"))
    assert "rm -rf" not in install.value  # nothing to remove: the wheels were never in a layer


def test_runs_as_a_non_root_user(dockerfile) -> None:
    users = final(dockerfile).all("USER")
    assert users, "the final stage has no USER"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit() and int(user) >= 1000  # numeric, so Kubernetes' runAsNonRoot can check it
    last_user_line = users[-1].line
    assert all(i.line < last_user_line for i in final(dockerfile).all("RUN")), "RUN after USER would run unprivileged"


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.value):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def test_environment_listens_in_the_container_with_known_variables(dockerfile) -> None:
    env = env_of(final(dockerfile))
    assert env["PROXY_HOST"] == "0.0.0.0"
    assert "ZEP_ALLOW_REMOTE" not in env  # the guard against default credentials stays on
    assert env["SOCKS_PORT"] == "1080" and env["HTTP_PORT"] == "8080"
    known = set(ENVIRONMENT.values())
    for name in env:
        assert name in known or name.startswith("PYTHON"), f"ENV {name} is not a zep setting"
    secrets = {"ZITI_IDENTITY", "PROXY_PASSWORD", *SECRET_FILES.values()}
    assert not secrets & set(env), "secrets come at run time"


@pytest.fixture(scope="module")
def own_network() -> list[str]:
    """A command prefix that runs a process in a network namespace of its own (only loopback, down):
    root needs no user namespace; others need unprivileged user namespaces, which some hosts forbid."""
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        if prefix == ["unshare", "--net"] and os.geteuid() != 0:
            continue
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    pytest.skip("no network namespace can be made here, and the image's CMD listens on 0.0.0.0 should its guard "
                "fail; the guard itself is tested in-process below")


def image_settings(dockerfile, env: dict[str, str]):
    flags = {name: None for name in ENVIRONMENT}
    return load_settings({**env_of(final(dockerfile)), **env}, flags)


def run_image_command(dockerfile, prefix: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The image's CMD with the image's ENV plus `env`, in a network namespace of its own: should the
    guard ever fail, zep listens on 0.0.0.0 of an empty namespace rather than of this machine."""
    cmd = final(dockerfile).all("CMD")[-1].exec_form()
    assert cmd[0] == "zep"
    base = {k: v for k, v in zep_env().items() if k not in ("PROXY_USERNAME", "PROXY_PASSWORD")}
    return subprocess.run([*prefix, sys.executable, "-m", "zep", *cmd[1:]],
                          env={**base, **env_of(final(dockerfile)), **env}, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


IDENTITY = base64.b64encode(json.dumps({"ztAPI": "https://ctrl.example.test:1280", "id": {}}).encode()).decode()


CREDENTIALS = [{}, {"PROXY_USERNAME": "user", "PROXY_PASSWORD": "password"}, {"PROXY_USERNAME": "", "PROXY_PASSWORD": ""}]
IDENTITIES = [{"ZITI_IDENTITY": IDENTITY}, {"ZEP_DIRECT": "true"}]


def assert_says_how_to_set_credentials(message: str) -> None:
    assert message.startswith("PROXY_HOST=0.0.0.0 is reachable from other machines"), message
    for name in ("PROXY_USERNAME", "PROXY_PASSWORD", "PROXY_PASSWORD_FILE"):
        assert name in message


@pytest.mark.parametrize("credentials", CREDENTIALS)
@pytest.mark.parametrize("identity", IDENTITIES)
def test_the_image_refuses_default_or_no_credentials_with_one_line_that_says_how(
        dockerfile, own_network: list[str], credentials: dict[str, str], identity: dict[str, str]) -> None:
    result = run_image_command(dockerfile, own_network, {**credentials, **identity})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zep: error: "), lines
    assert_says_how_to_set_credentials(lines[0].removeprefix("zep: error: "))


@pytest.mark.parametrize("credentials", CREDENTIALS)
def test_the_image_environment_refuses_default_or_no_credentials(dockerfile, credentials: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        image_settings(dockerfile, {**credentials, "ZEP_DIRECT": "true"})
    assert_says_how_to_set_credentials(str(caught.value))


def test_the_image_accepts_a_password_file(dockerfile, own_network: list[str], tmp_path: Path) -> None:
    # Real credentials get past the guard; a bad identity then stops zep, still before it listens.
    (tmp_path / "proxy-password").write_text("s3cret-from-a-file\n")
    result = run_image_command(dockerfile, own_network, {"PROXY_PASSWORD_FILE": str(tmp_path / "proxy-password"),
                                                         "ZITI_IDENTITY": "not an identity"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "zep: error: ZITI_IDENTITY is not valid base64 (expected the base64 of an identity JSON file, or the JSON itself)"]
    settings = image_settings(dockerfile, {"PROXY_PASSWORD_FILE": str(tmp_path / "proxy-password"), "ZEP_DIRECT": "1"})
    assert (settings.proxy_host, settings.username, settings.password) == ("0.0.0.0", "user", "s3cret-from-a-file")


def test_exposes_the_two_listeners_and_serves(dockerfile) -> None:
    stage = final(dockerfile)
    exposed = {port for i in stage.all("EXPOSE") for port in i.value.split()}
    assert exposed == {"1080", "8080"}
    assert stage.all("CMD")[-1].exec_form() == ["zep", "serve"]


def healthcheck_command(dockerfile) -> list[str]:
    checks = final(dockerfile).all("HEALTHCHECK")
    assert len(checks) == 1
    command = checks[0].exec_form()
    assert command and command[0] == "python" and command[1] == "-c"
    return command


def test_healthcheck_probes_often_while_starting_then_rarely(dockerfile) -> None:
    (check,) = final(dockerfile).all("HEALTHCHECK")
    flags, _ = check.flags_and_args()
    seconds = {name: float(value.rstrip("s")) for name, value in flags.items() if value.endswith("s")}
    assert seconds["start-interval"] <= 2 < seconds["interval"]
    # Identities may take ZEP_ZITI_LOAD_TIMEOUT to load: the start period covers that default.
    assert seconds["start-period"] >= Settings().ziti_load_timeout and seconds["timeout"] < seconds["interval"]


def run_healthcheck(dockerfile, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The HEALTHCHECK command as Docker runs it: in the container's environment, the image's ENV."""
    return subprocess.run([sys.executable, *command[1:]], env={**zep_env(), **env_of(final(dockerfile)), **env},
                          capture_output=True, text=True, timeout=30)


def image_zep(dockerfile, *args: str, env: dict[str, str] | None = None, **kwargs):
    """zep with the image's ENV and real credentials, on loopback ports of this machine (flags win).
    The admin port is the one thing changed: 0, so that tests never collide on 9090."""
    return start_zep(*args, env={**env_of(final(dockerfile)), "PROXY_USERNAME": "ci", "PROXY_PASSWORD": "s3cret",
                                 "ZEP_ADMIN_ADDRESS": "127.0.0.1:0", **(env or {})}, **kwargs)


def admin_of(zp) -> dict[str, str]:
    """The container environment the check would see had the image's 9090 been this zep's admin port."""
    assert zp.admin_port, "the image's ENV opens no admin listener"
    return {"ZEP_ADMIN_ADDRESS": f"127.0.0.1:{zp.admin_port}"}


def test_the_image_serves_the_admin_listener_on_loopback(dockerfile) -> None:
    env = env_of(final(dockerfile))
    assert env["ZEP_ADMIN_ADDRESS"] == "127.0.0.1:9090"
    assert image_settings(dockerfile, {"PROXY_USERNAME": "ci", "PROXY_PASSWORD": "s3cret", "ZEP_DIRECT": "1"}
                          ).admin_address == "127.0.0.1:9090"
    assert "9090" not in {port for i in final(dockerfile).all("EXPOSE") for port in i.value.split()}


def test_healthcheck_asks_readyz_with_the_standard_library(dockerfile) -> None:
    script = healthcheck_command(dockerfile)[2]
    assert "urllib.request" in script and "/readyz" in script and "127.0.0.1" in script
    assert "curl" not in script and "socket" not in script  # no proxy connection, so no access line


def test_healthcheck_passes_against_a_ready_zep_and_logs_nothing(dockerfile) -> None:
    command = healthcheck_command(dockerfile)
    with image_zep(dockerfile, "--direct") as zp:
        assert zp.ready_info()["admin"] == f"127.0.0.1:{zp.admin_port}"
        result = run_healthcheck(dockerfile, command, admin_of(zp))
        assert result.returncode == 0, result.stderr
        # A proxy variable in the container does not divert the probe (this one leads nowhere).
        diverted = run_healthcheck(dockerfile, command, {**admin_of(zp), "http_proxy": "http://127.0.0.1:9",
                                                         "HTTP_PROXY": "http://127.0.0.1:9"})
        assert diverted.returncode == 0, diverted.stderr
        assert zp.access_lines() == [] and " ERROR " not in zp.log_text()


def test_healthcheck_fails_while_identities_load_and_without_an_admin_listener(
        dockerfile, tmp_path: Path, openziti_path: Path) -> None:
    from tests.support.upstreams import closed_port

    command = healthcheck_command(dockerfile)
    identity = write_identity(tmp_path / "team.json", [service("web", ["web.example.test"], ["80"], "127.0.0.1:9")],
                              load_delay_ms=1500)
    with image_zep(dockerfile, env={"ZITI_IDENTITY_FILE": str(identity)}, extra_pythonpath=[str(openziti_path)],
                   wait_ready=False) as zp:
        line = zp.wait_for_log("listening: admin on 127.0.0.1:")
        loading = {"ZEP_ADMIN_ADDRESS": line.rsplit(" on ", 1)[1].split()[0]}
        result = run_healthcheck(dockerfile, command, loading)
        assert result.returncode != 0 and "503" in result.stderr, result.stderr
        assert "ziti identity loaded" not in zp.log_text()  # still loading when the check failed
        zp.wait_ready()
        assert run_healthcheck(dockerfile, command, admin_of(zp)).returncode == 0
    refused = run_healthcheck(dockerfile, command, {"ZEP_ADMIN_ADDRESS": f"127.0.0.1:{closed_port()}"})
    assert refused.returncode != 0 and "Connection refused" in refused.stderr


def test_healthcheck_fails_while_draining(dockerfile, echo) -> None:
    import signal

    from tests.support.clients import socks_session

    command = healthcheck_command(dockerfile)
    with image_zep(dockerfile, "--direct", "--no-auth", env={"PROXY_USERNAME": "", "PROXY_PASSWORD": "",
                                                            "ZEP_DRAIN_TIMEOUT": "20"}) as zp:
        with socks_session(zp.socks_port, "127.0.0.1", echo.port) as (sock, reply):
            assert reply == 0
            zp.proc.send_signal(signal.SIGTERM)
            zp.wait_for_log("draining: no new connections; 1 open ones")
            result = run_healthcheck(dockerfile, command, admin_of(zp))
            assert result.returncode != 0 and "503" in result.stderr, result.stderr
        assert zp.proc.wait(10) == 0
