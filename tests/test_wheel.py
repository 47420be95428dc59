"""What a release publishes: the sdist of a clean copy of the sources carries the relay's Cython
sources (not generated C); `pip wheel` on that sdist, as pip does where no wheel fits, gives a
platform wheel with the compiled relay; and `zep version` in a fresh environment with that wheel
installed says the relay is the compiled one. cibuildwheel runs the same check on every release
wheel (`[tool.cibuildwheel]` in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 600  # seconds: a cold pip cache fetches setuptools and Cython, and the C compile is large
# Not copied: whatever a build of the working tree left (the generated C, the extension, metadata).
LEFT_BY_BUILDS = (".venv", ".git", "build", "dist", "tests", "benchmarks", ".hypothesis", ".benchmarks",
                  "__pycache__")


def source_copy(destination: Path) -> Path:
    def ignore(_directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n in LEFT_BY_BUILDS or n.endswith((".so", ".c", ".egg-info"))]

    return Path(shutil.copytree(ROOT, destination, ignore=ignore))


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL,
                            **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.build
@pytest.mark.timeout(BUILD_TIMEOUT * 2)
def test_the_sdist_builds_a_wheel_that_carries_and_runs_the_compiled_relay(tmp_path: Path) -> None:
    sources = source_copy(tmp_path / "sources")
    assert not list(sources.rglob("_relay*.so")) and not list(sources.rglob("_relay.c"))
    run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(sources)])
    (sdist,) = (tmp_path / "dist").glob("ziti_edge_proxy-*.tar.gz")
    members = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {"src/zep/_relay.pyx", "src/zep/includes/system.pxd", "setup.py", "README.md"} <= members
    assert "src/zep/_relay.c" not in members

    # -O0: this checks the packaging, not the optimizer, and compiles several times faster.
    env = {**os.environ, "CFLAGS": "-O0"}
    env.pop("ZEP_NO_EXTENSIONS", None)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"),
         str(sdist)], env=env)
    (wheel,) = (tmp_path / "wheels").glob("ziti_edge_proxy-*.whl")
    assert "-linux_" in wheel.name or "manylinux" in wheel.name  # a platform wheel, not py3-none-any
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("zep/_relay") and n.endswith(".so")], names
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c"))], names

    environment = tmp_path / "fresh"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZEP_NO_EXTENSIONS")}
    version = run([str(environment / "bin" / "zep"), "version"], env=clean, cwd=tmp_path)
    assert "relay: cython (compiled splice engine" in version.stdout, version.stdout
    located = run([str(python), "-c", "import zep._relay; print(zep._relay.__file__)"], env=clean, cwd=tmp_path)
    assert located.stdout.startswith(str(environment))  # the installed wheel's relay, not the working tree's
