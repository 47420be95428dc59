"""The Ziti stand-in: compile it, fetch the pinned `openziti` sdist, and assemble an importable package.

The `openziti` sdist downloads the real native library at build time, which tests cannot do, so
the tests run the sdist's own Python code (`src/openziti`, unchanged) with the stand-in in
`tests/ziti_standin/` installed as its `lib/libziti.so`. The sdist is fetched once with pip,
checked against its published sha256, and cached; nothing of it is ever committed.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

OPENZITI_VERSION = "1.7.1"
OPENZITI_SDIST = f"openziti-{OPENZITI_VERSION}.tar.gz"
OPENZITI_SHA256 = "1c403a4391f41d91a84d5c7ae6d415d0c3403d0c18636d46786ce2fc910fd96f"
STANDIN_SOURCE = Path(__file__).resolve().parent.parent / "ziti_standin" / "standin.c"

# Values of the SDK's error codes (includes/ziti/errors.h) that tests refer to.
ZITI_AUTHENTICATION_FAILED = -14


def cache_dir() -> Path:
    """Where the sdist is kept between runs: $ZEP_TEST_CACHE, else ~/.cache/zep-tests."""
    configured = os.environ.get("ZEP_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "zep-tests"


def compile_standin(directory: Path) -> Path:
    """Build the stand-in shared library; libc is linked explicitly so `free` resolves through it."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"the Ziti stand-in needs a C compiler: {cc!r} was not found (set CC)")
    output = directory / "libziti.so"
    command = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(output),
               str(STANDIN_SOURCE), "-Wl,--no-as-needed", "-lc"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the Ziti stand-in failed:\n{' '.join(command)}\n{result.stderr}")
    return output


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    """The pinned sdist: $ZEP_OPENZITI_SDIST, else the cached copy, else downloaded with pip; sha256-checked."""
    given = os.environ.get("ZEP_OPENZITI_SDIST")
    cached = Path(given) if given else cache_dir() / OPENZITI_SDIST
    if not cached.exists() and not given:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                       f"openziti=={OPENZITI_VERSION}", "--dest", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            downloaded = Path(tmp, OPENZITI_SDIST)
            if result.returncode != 0 or not downloaded.exists():
                raise RuntimeError(f"could not download {OPENZITI_SDIST} with pip:\n{result.stdout}{result.stderr}")
            os.replace(downloaded, cached)
    actual = sha256_of(cached)
    if actual != OPENZITI_SHA256:
        raise RuntimeError(f"{cached} has sha256 {actual}, expected {OPENZITI_SHA256}; delete it to fetch again")
    return cached


def build_package_dir(sdist: Path, library: Path, directory: Path) -> Path:
    """Extract the sdist's `src/openziti` into `directory/openziti`, with the stand-in as lib/libziti.so.

    The sdist ships a generated `_version.py`, so the package imports as is. Returns the directory
    to put on sys.path / PYTHONPATH.
    """
    prefix = f"openziti-{OPENZITI_VERSION}/src/openziti/"
    package = directory / "openziti"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix) or not member.isfile():
                continue
            relative = member.name[len(prefix):]
            if not relative.endswith(".py") or "/" in relative:
                continue
            target = package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
    if not (package / "zitilib.py").exists():
        raise RuntimeError(f"{sdist} has no {prefix}zitilib.py")
    (package / "lib").mkdir(exist_ok=True)
    shutil.copy2(library, package / "lib" / "libziti.so")
    return directory


@pytest.fixture(scope="session")
def standin_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_standin(tmp_path_factory.mktemp("ziti-standin"))


@pytest.fixture(scope="session")
def openziti_path(standin_library: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the real `openziti` package on top of the stand-in: add it to sys.path."""
    return build_package_dir(fetch_sdist(), standin_library, tmp_path_factory.mktemp("openziti-site"))


@pytest.fixture(scope="module")
def sdk_on_path(openziti_path: Path) -> Iterator[Path]:
    """The real `openziti` package over the stand-in, importable in the test process."""
    sys.path.insert(0, str(openziti_path))
    try:
        yield openziti_path
    finally:
        sys.path.remove(str(openziti_path))


# ---------------------------------------------------------------------------------- test identities

def service(name: str, addresses: Iterable[str] = (), ports: Iterable[str | int] = ("1-65535",),
            target: str | None = None, **switches: Any) -> dict[str, Any]:
    """One service of a test identity; switches: fail_dial, dial_delay_ms, call_delay_ms."""
    entry: dict[str, Any] = {"name": name, "intercepts": {"addresses": list(addresses), "ports": [str(p) for p in ports]}}
    if target is not None:
        entry["target"] = target
    entry.update(switches)
    return entry


CONTROLLER = "https://controller.standin.test:1280"


@functools.lru_cache(maxsize=None)
def credentials(name: str = "standin-client") -> tuple[str, str]:
    """A PEM private key and a self-signed PEM certificate for it, made once per test process."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def identity_document(services: Iterable[Mapping[str, Any]] = (), **standin: Any) -> dict[str, Any]:
    """A test identity as the SDK writes one (a real key and certificate, inline with `pem:`), plus
    the stand-in's services (and load_delay_ms, load_error)."""
    key, cert = credentials()
    return {
        "ztAPI": CONTROLLER,
        "id": {"cert": "pem:" + cert, "key": "pem:" + key, "ca": "pem:" + cert},
        "standin": {"services": list(services), **standin},
    }


def real_identity_document() -> dict[str, Any]:
    """An identity without the stand-in's part: it passes pre-flight, and its controller is unreachable."""
    document = identity_document()
    del document["standin"]
    return document


def write_identity(path: Path, services: Iterable[Mapping[str, Any]] = (), **standin: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity_document(services, **standin), indent=2))
    return path


# ---------------------------------------------------------------------------------- enrollment tokens

def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def enrollment_claims(path: Path, services: Iterable[Mapping[str, Any]] = (), *, expires_in: float = 3600,
                      controller: str = CONTROLLER, **standin: Any) -> dict[str, Any]:
    """The claims of a one-time token (as a controller issues them: iss, sub, jti, em, exp) plus what
    the stand-in answers with: the key and certificate, the services, its ledger of used tokens
    (beside the token's file), and switches (enroll_delay_ms)."""
    key, cert = credentials()
    return {
        "iss": controller, "sub": f"identity-{path.stem}", "jti": str(uuid.uuid4()), "em": "ott",
        "exp": int(time.time() + expires_in),
        "standin": {"ledger": f"{path}.used", "key": key, "cert": cert, "ca": cert, "services": list(services),
                    **standin},
    }


def jwt(claims: Mapping[str, Any]) -> str:
    """A JWT-shaped token: base64url header, claims and (not checked by the stand-in) signature."""
    header = {"alg": "RS256", "typ": "JWT"}
    return ".".join([_base64url(json.dumps(header).encode()), _base64url(json.dumps(claims).encode()),
                     _base64url(b"standin-signature")])


def write_enrollment_token(path: Path, services: Iterable[Mapping[str, Any]] = (), **options: Any) -> str:
    """Write a one-time token to `path` (mode 0600, as a downloaded .jwt should be) and return it."""
    token = jwt(enrollment_claims(path, services, **options))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token
