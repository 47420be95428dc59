"""The GitHub workflows cannot run here: actionlint checks them (expressions, action inputs, the shell
in `run:` steps with shellcheck when it is on PATH, deprecated action runtimes), and these tests
check the promises a release makes: what triggers it, what is tested before anything is pushed,
what is published and how."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from zep.config import ENVIRONMENT, SECRET_FILES

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
# The first majors on the node24 runtime (earlier ones run on the deprecated node20).
CURRENT_MAJORS = {
    "actions/checkout": 6, "actions/setup-python": 6, "actions/upload-artifact": 7, "actions/download-artifact": 8,
    "docker/setup-buildx-action": 4, "docker/setup-qemu-action": 4, "docker/build-push-action": 7,
    "docker/login-action": 4, "docker/metadata-action": 6,
}


def actionlint() -> str | None:
    beside_python = Path(sys.executable).with_name("actionlint")  # the test extra installs it into the venv
    return str(beside_python) if beside_python.exists() else shutil.which("actionlint")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job["steps"]


def uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in steps(job) if step.get("uses", "").split("@")[0] == action]


def test_actionlint_finds_nothing() -> None:
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (pip install -e '.[test]' installs it on Linux)")
    result = subprocess.run([binary, "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actions_are_pinned_to_current_versions() -> None:
    seen = set()
    for path in WORKFLOWS:
        for action, ref in re.findall(r"uses:\s*([\w.-]+/[\w.-]+)@([\w./-]+)", path.read_text()):
            seen.add(action)
            assert ref not in ("main", "master"), f"{path.name}: {action}@{ref} follows a branch"
            if action in CURRENT_MAJORS:
                major = int(re.match(r"v(\d+)", ref).group(1))
                assert major >= CURRENT_MAJORS[action], f"{path.name}: {action}@{ref} runs on a deprecated runtime"
    assert {"actions/checkout", "docker/build-push-action", "pypa/cibuildwheel", "pypa/gh-action-pypi-publish"} <= seen


def test_release_runs_on_version_tags_and_publishes_only_what_passed() -> None:
    release = load("release.yml")
    assert release[True]["push"] == {"tags": ["v*"]}  # YAML 1.1 reads the key `on` as True
    jobs = release["jobs"]
    assert set(jobs["pypi"]["needs"]) == {"sdist", "wheels", "image"}
    assert release["permissions"] == {"contents": "read"}


def test_wheels_for_both_architectures_with_the_compiled_relay() -> None:
    wheels = load("release.yml")["jobs"]["wheels"]
    assert wheels["strategy"]["matrix"]["arch"] == ["x86_64", "aarch64"]
    (build,) = uses(wheels, "pypa/cibuildwheel")
    assert build["env"]["CIBW_ARCHS_LINUX"] == "${{ matrix.arch }}"
    assert uses(wheels, "docker/setup-qemu-action")[0]["if"] == "matrix.arch == 'aarch64'"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    assert config["build"] == ["cp311-manylinux_*", "cp312-manylinux_*", "cp313-manylinux_*"]
    assert config["test-command"] == "zep version | grep -F 'relay: cython'"


def test_pypi_by_trusted_publishing_from_an_environment() -> None:
    pypi = load("release.yml")["jobs"]["pypi"]
    assert pypi["permissions"] == {"id-token": "write"}
    assert pypi["environment"]["name"] == "pypi"
    assert uses(pypi, "pypa/gh-action-pypi-publish") and "password" not in str(pypi)  # no API token


def test_the_image_is_smoke_tested_before_it_is_pushed_with_sbom_and_provenance() -> None:
    image = load("release.yml")["jobs"]["image"]
    assert image["permissions"] == {"contents": "read", "packages": "write"}
    order = [step.get("uses", "").split("@")[0] or step.get("run", "") for step in steps(image)]
    smoke = order.index("scripts/smoke-test-image.sh ziti-edge-proxy:smoke")
    local, pushed = uses(image, "docker/build-push-action")
    assert local["with"]["load"] is True and "push" not in local["with"]
    assert order.index("docker/build-push-action") < smoke < order.index("docker/login-action")
    assert pushed["with"]["push"] is True
    assert pushed["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert pushed["with"]["sbom"] is True and pushed["with"]["provenance"] == "mode=max"
    (meta,) = uses(image, "docker/metadata-action")
    assert meta["with"]["images"] == "ghcr.io/${{ github.repository_owner }}/ziti-edge-proxy"


def test_every_push_builds_and_smoke_tests_the_image_without_pushing() -> None:
    ci = load("ci.yml")
    assert "push" in ci[True] and "pull_request" in ci[True]
    image = ci["jobs"]["image"]
    (build,) = uses(image, "docker/build-push-action")
    assert build["with"]["push"] is False and build["with"]["load"] is True
    assert steps(image)[-1]["run"] == f"scripts/smoke-test-image.sh {build['with']['tags']}"
    assert not uses(image, "docker/login-action")


def test_the_smoke_scripts_are_executable() -> None:
    for name in ("smoke-test-image.sh", "smoke_test.py"):
        assert os.access(ROOT / "scripts" / name, os.X_OK), name


def test_the_image_smoke_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    result = subprocess.run(["shellcheck", str(ROOT / "scripts" / "smoke-test-image.sh")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_the_image_smoke_script_sets_only_variables_zep_reads() -> None:
    script = (ROOT / "scripts" / "smoke-test-image.sh").read_text()
    names = set(re.findall(r"-e ([A-Z_]+)=", script))
    assert {"ZEP_DIRECT", "PROXY_USERNAME", "PROXY_PASSWORD_FILE"} <= names
    assert names <= set(ENVIRONMENT.values()) | set(SECRET_FILES.values())
