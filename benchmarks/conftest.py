"""Fixtures of the benchmark suite: the load generator, the target servers, the Ziti stand-in.

Run with `pytest benchmarks/` (the default test paths are `tests/` only); `ZEP_BENCH_QUICK=1`
runs a few seconds per workload instead of the full sizes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# `tests.support` (start_zep, the Ziti stand-in) and, when the package is not installed, `zep`
# itself for the zep subprocesses.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
try:
    import zep  # noqa: F401
except ImportError:
    sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from benchmarks.harness import ZepLoad, raise_nofile  # noqa: E402

# 2,000 idle tunnels need about 4,000 fds in the proxy and 2,000 in the client; children inherit this.
raise_nofile()


@pytest.fixture(scope="session")
def zepload(tmp_path_factory: pytest.TempPathFactory) -> ZepLoad:
    try:
        return ZepLoad.build(tmp_path_factory.mktemp("zepload"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def servers(zepload: ZepLoad) -> Iterator[dict[str, int]]:
    with zepload.serve() as ports:
        yield ports


@pytest.fixture(scope="session")
def ziti_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path | None, str | None]:
    """(directory holding `openziti` over the stand-in library, None) or (None, why it is missing)."""
    try:
        from tests.support.ziti import build_package_dir, compile_standin, fetch_sdist

        library = compile_standin(tmp_path_factory.mktemp("ziti-standin"))
        return build_package_dir(fetch_sdist(), library, tmp_path_factory.mktemp("openziti-site")), None
    except Exception as exc:  # no compiler, no network for the sdist, ...: the row is skipped, said why
        return None, f"Ziti stand-in unavailable: {exc}".splitlines()[0]
