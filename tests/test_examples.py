"""The examples and the README's shell snippets: they parse, they use only commands and options zep
has, and the parts that can run here (the composite action's start step, the README's URL
splitting) run for real against a real zep."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.clients import curl
from tests.support.upstreams import Upstream
from tests.support.zepproc import zep_env
from zep.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.y*ml"))
ACTION = ROOT / "action.yml"
STEP_TIMEOUT = 60.0
PROXY_VARIABLES = {"ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                   "NO_PROXY", "no_proxy"}
# `zep SUBCOMMAND ...` in a shell line; `"$zep" serve` counts too (a variable holding zep's path).
ZEP_CALL = re.compile(r'(?<![\w.-])zep"?[ \t]+([a-z][a-z-]*)([^;&|<>()\n]*)')


def load(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def walk(node: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair in a YAML document, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key), value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def shell_snippets(path: Path) -> list[str]:
    """The shell a CI file runs: GitHub `run`, GitLab `*script`, Kubernetes `sh -c` args."""
    snippets: list[str] = []
    for document in load(path):
        for key, value in walk(document):
            lines = value if isinstance(value, list) else [value]
            if key in ("run", "script", "before_script", "after_script", "args") and all(isinstance(v, str) for v in lines):
                snippets.extend(lines)
    return snippets


def readme_shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def zep_calls(snippet: str) -> list[tuple[str, list[str]]]:
    """(subcommand, options) of each zep call in a snippet, comments left out."""
    text = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in snippet.splitlines())
    text = text.replace("\\\n", " ")
    return [(match[1], re.findall(r"(?<!\S)--[a-z][a-z-]*", match[2].partition(" -- ")[0]))
            for match in ZEP_CALL.finditer(text)]


ALL_SNIPPETS = [(path.name, snippet) for path in [*EXAMPLES, ACTION] for snippet in shell_snippets(path)] + [
    ("README.md", block) for block in readme_shell_blocks()]


def test_every_example_parses() -> None:
    assert {path.name for path in EXAMPLES} >= {"github-actions.yml", "gitlab-ci.yml", "docker-compose.yml",
                                                "kubernetes-pod.yaml"}
    for path in [*EXAMPLES, ACTION]:
        documents = load(path)
        assert documents and all(isinstance(document, dict) for document in documents), path.name


def test_the_snippets_call_zep() -> None:
    calls = {name: [call for _, snippet in ALL_SNIPPETS if _ == name for call in zep_calls(snippet)]
             for name in {name for name, _ in ALL_SNIPPETS}}
    used = {sub for found in calls.values() for sub, _ in found}
    assert used >= {"run", "serve", "env"}
    for name in ("github-actions.yml", "gitlab-ci.yml", "action.yml", "README.md"):
        assert calls[name], f"{name} never calls zep"


@pytest.mark.parametrize(("source", "snippet"), ALL_SNIPPETS, ids=[f"{name}-{i}" for i, (name, _) in enumerate(ALL_SNIPPETS)])
def test_snippets_use_only_commands_and_options_zep_has(source: str, snippet: str) -> None:
    commands = subcommands()
    for sub, options in zep_calls(snippet):
        assert sub in commands, f"{source}: zep {sub} is not a zep command"
        known = set(commands[sub]._option_string_actions)
        unknown = [option for option in options if option not in known]
        assert not unknown, f"{source}: zep {sub} has no option {', '.join(unknown)}"
        if sub == "run":
            assert re.search(r"zep\"?\s+run\b[^\n]*\s--\s", snippet.replace("\\\n", " ")), \
                f"{source}: zep run without -- before the command"


def test_action_inputs_are_declared_and_never_pasted_into_scripts() -> None:
    action = load(ACTION)[0]
    declared = set(action["inputs"])
    text = ACTION.read_text()
    assert set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", text)) <= declared
    for step in action["runs"]["steps"]:
        # Inputs reach the scripts through env, so no input can inject shell code.
        assert "${{" not in step.get("run", ""), step["name"]
        assert step["shell"] == "bash"


def test_compose_and_pod_keep_zep_private() -> None:
    compose = load(ROOT / "examples" / "docker-compose.yml")[0]
    zep = compose["services"]["zep"]
    assert zep["build"]["context"] == ".." and all(p.startswith("127.0.0.1:") for p in zep["ports"])
    assert set(compose["services"]["job"]["environment"]) == PROXY_VARIABLES
    pod = load(ROOT / "examples" / "kubernetes-pod.yaml")[0]
    sidecar = pod["spec"]["initContainers"][0]
    env = {item["name"]: item.get("value") for item in sidecar["env"]}
    assert sidecar["restartPolicy"] == "Always"
    assert env["PROXY_HOST"] == "127.0.0.1" and env["ZEP_ADMIN_ADDRESS"] == "127.0.0.1:9090"
    probes = json.dumps([sidecar[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")])
    assert "/readyz" in probes and "/healthz" in probes
    job = {item["name"] for item in pod["spec"]["containers"][0]["env"]}
    assert job >= PROXY_VARIABLES


def test_github_example_uses_the_identity_secret_in_each_job() -> None:
    workflow = load(ROOT / "examples" / "github-actions.yml")[0]
    for name, job in workflow["jobs"].items():
        assert any("secrets.ZITI_IDENTITY" in json.dumps(step) for step in job["steps"]), name


# ------------------------------------------------------------------ what can run here, runs


def test_the_actions_start_step_exports_working_variables(tmp_path: Path, http_a: Upstream) -> None:
    step = next(s for s in load(ACTION)[0]["runs"]["steps"] if s.get("id") == "start")
    runner_temp = tmp_path / "runner"
    (runner_temp / "zep-venv" / "bin").mkdir(parents=True)
    (runner_temp / "zep-venv" / "bin" / "zep").symlink_to(Path(sys.executable).parent / "zep")
    github_env, github_output = tmp_path / "github_env", tmp_path / "github_output"
    env = zep_env({"RUNNER_TEMP": str(runner_temp), "GITHUB_ENV": str(github_env), "GITHUB_OUTPUT": str(github_output),
                   "ZITI_IDENTITY": "", "ZITI_IDENTITIES": "", "ZEP_FALLBACK": "direct", "ZEP_NO_PROXY": "mirror.test",
                   "ZEP_WAIT": "30", "ZEP_DIRECT": "true"})
    result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], env=env,
                            capture_output=True, text=True, timeout=STEP_TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    ready = runner_temp / "zep.ready"
    info = json.loads(ready.read_text())
    try:
        assert f"::add-mask::{info['password']}" in result.stdout.splitlines()
        exported = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
        assert set(exported) == PROXY_VARIABLES
        assert exported["no_proxy"] == "localhost,127.0.0.1,::1,mirror.test"
        outputs = dict(line.split("=", 1) for line in github_output.read_text().splitlines())
        assert outputs == {"ready-file": str(ready), "log-file": str(runner_temp / "zep.log")}
        fetched = curl("-x", exported["HTTPS_PROXY"], f"http://localhost:{http_a.port}/whoami")
        assert fetched.returncode == 0 and json.loads(fetched.stdout)["server"] == "a"
        fetched = curl("-x", exported["ALL_PROXY"], f"http://localhost:{http_a.port}/whoami")
        assert fetched.returncode == 0 and json.loads(fetched.stdout)["server"] == "a"
    finally:
        os.kill(info["pid"], 15)
    deadline = time.monotonic() + STEP_TIMEOUT
    while ready.exists():  # zep removes its ready file as it exits
        assert time.monotonic() < deadline, "zep did not exit after SIGTERM"
        time.sleep(0.02)
    assert f"user={info['username']} " in (runner_temp / "zep.log").read_text()


def test_readme_splits_the_proxy_urls_into_their_parts() -> None:
    block = next(b for b in readme_shell_blocks() if "JOB_PROXY_USER" in b)
    script = block + 'printf "%s\\n" "$JOB_PROXY_USER" "$JOB_PROXY_PASS" "$JOB_PROXY_HOST" "$JOB_PROXY_HTTP_PORT" "$JOB_PROXY_SOCKS_PORT"\n'
    env = {"PATH": os.environ["PATH"], "HTTPS_PROXY": "http://zep-1a2b3c4d:Tok_en-9x@127.0.0.1:41234",
           "ALL_PROXY": "socks5h://zep-1a2b3c4d:Tok_en-9x@127.0.0.1:40111"}
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["zep-1a2b3c4d", "Tok_en-9x", "127.0.0.1", "41234", "40111"]


def test_the_snippet_check_sees_zep_calls_and_their_options() -> None:
    snippet = ('.zep/bin/zep run --direct --fallback deny -- curl --fail x  # zep in a comment\n'
               '"$zep" serve --random-credentials \\\n    --ready-file r > zep.log 2>&1 &\n'
               'zep frobnicate --now; echo zep.log\n')
    assert zep_calls(snippet) == [("run", ["--direct", "--fallback"]), ("serve", ["--random-credentials", "--ready-file"]),
                                  ("frobnicate", ["--now"])]


@pytest.mark.parametrize("starts", [True, False])
def test_readme_several_steps_snippet_exports_or_fails_at_once(tmp_path: Path, http_a: Upstream, starts: bool) -> None:
    block = next(b for b in readme_shell_blocks() if "zep env" in b and "exports=" in b)
    probe = f'curl --silent --fail --noproxy "" -x "$HTTPS_PROXY" http://localhost:{http_a.port}/whoami\nkill $!\n'
    env = zep_env({"RUNNER_TEMP": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    if starts:
        env["ZEP_DIRECT"] = "true"  # else: no identity, so zep exits at once with code 2
    result = subprocess.run(["sh", "-c", block + probe], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if starts:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["server"] == "a"
    else:
        assert result.returncode == 1
        assert "zep: error: no Ziti identity configured" in result.stdout  # the log, shown by the snippet
        assert "exited before it was ready" in result.stderr  # --pid: no waiting out --wait 60
