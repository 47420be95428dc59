"""The Ziti dialer: the only module that imports `openziti`, the official OpenZiti Python SDK.

`start(settings)` loads every configured identity (files, `;` lists, globs, one identity in
`ZITI_IDENTITY` as JSON or base64, or one enrolled now from a one-time token, `ZITI_ENROLL_TOKEN`)
with a bounded wait and returns a `ZitiDialer` for the Router. Each identity passes zep's pre-flight
(`identity_check`) before the SDK sees it; `enroll_to_file` is `zep enroll`.

How a target is dialed (the SDK's `Ziti_connect_addr` / `Ziti_connect`, see ZITI.md):
1. If a service's intercept config matches (host, port) in any loaded identity, dial it.
2. Else, if the host is `<service><suffix>` (default suffix `.ziti`), dial that service by name;
   no identity has it: HOST_UNREACHABLE.
3. Else return None: the Router applies the fallback policy (direct or deny).

The SDK connects our socket to a loopback bridge before the overlay dial has finished, so a dial
that fails afterwards shows up as a reset before the first upstream byte; the access log reports
that as `ziti-dial-failed`. The SDK calls block on the SDK's own loop thread, so they run in a
small thread pool and never on the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import concurrent.futures
import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from zep.dial import DialError, Failure, Upstream
from zep.enrollment import TOKEN_VARIABLE, EnrollmentError, EnrollmentToken, IdentityOutput, parse_token, token_from_file
from zep.identity_check import InvalidIdentity, check_identity

log = logging.getLogger("zep.ziti")

INSTALL_HINT = "pip install 'ziti-edge-proxy[ziti]'"
# `import openziti` would load ZITI_IDENTITIES itself (no globs, no timeout): take them out first.
# None of these may reach what zep starts: they are identities and a one-time enrollment token.
SECRET_VARIABLES = ("ZITI_IDENTITIES", "ZITI_IDENTITY", TOKEN_VARIABLE)
ENCODED_LABEL = "ZITI_IDENTITY"

# Ziti error codes (includes/ziti/errors.h in the C SDK).
ZITI_JWT_INVALID = -3
ZITI_JWT_INVALID_FORMAT = -4
ZITI_CONTROLLER_UNAVAILABLE = -16
ZITI_SERVICE_UNAVAILABLE = -18
ZITI_TIMEOUT = -20
LAST_ERROR_CODE = -43  # ZITI_NOT_SUPPORTED
ENROLL_HINTS = {
    ZITI_JWT_INVALID: "the controller refused it: it was used before, has expired or was revoked; ask for a new one",
    ZITI_JWT_INVALID_FORMAT: "it is not an enrollment token",
    ZITI_CONTROLLER_UNAVAILABLE: "the controller named in the token cannot be reached",
}

# The SDK does not say which service matched an intercept address, only that one did.
INTERCEPT_ROUTE = "ziti:intercept"

DIAL_THREADS = 16
SHUTDOWN_WAIT = 5.0


class ZitiSetupError(Exception):
    """Ziti cannot start as configured; the message names the identity or the missing piece."""


@dataclass(frozen=True)
class Identity:
    label: str  # how messages name it: the configured path, or ZITI_IDENTITY
    path: str  # the file handed to the SDK
    handle: int = -1  # the SDK's context handle once loaded
    controller: str = "unknown"


# ----------------------------------------------------------------------------- configuration

def expand_identity_entries(entries: Iterable[str]) -> list[str]:
    """Identity files from `ZITI_IDENTITIES` entries: globs expanded (sorted), each file once.

    A plain entry that is not a file, or a glob that matches no file, is an error naming it.
    """
    paths: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        expanded = os.path.expanduser(entry)
        if any(c in expanded for c in "*?["):
            matches = sorted(p for p in glob.glob(expanded) if os.path.isfile(p))
            if not matches:
                raise ZitiSetupError(f"Ziti identity pattern {entry} matches no file")
        elif os.path.isfile(expanded):
            matches = [expanded]
        elif os.path.exists(expanded):
            raise ZitiSetupError(f"Ziti identity {entry} is not a file")
        else:
            raise ZitiSetupError(f"Ziti identity file {entry} does not exist")
        for path in matches:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def decode_identity(text: str, label: str = ENCODED_LABEL) -> bytes:
    """The identity JSON from ZITI_IDENTITY (or ZITI_IDENTITY_FILE): the document itself, or its base64
    (whitespace and line breaks allowed). `label` names the variable in errors; no error quotes the text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        data = stripped.encode()
        if not isinstance(_json_document(data), dict):
            raise ZitiSetupError(f"{label} starts like JSON but is not an identity JSON document")
        return data
    try:
        data = base64.b64decode("".join(stripped.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ZitiSetupError(f"{label} is not valid base64 (expected the base64 of an identity JSON file, "
                             "or the JSON itself)") from None
    if not isinstance(_json_document(data), dict):
        raise ZitiSetupError(f"{label} is base64 but does not decode to an identity JSON document")
    return data


def _json_document(data: bytes) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None


class PrivateDirectory:
    """A mode-0700 temporary directory for decoded identities, removed by remove() and at exit."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="zep-ziti-")
        atexit.register(self.remove)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        atexit.unregister(self.remove)


def normalize_suffix(suffix: str | None) -> str:
    """`ziti` and `.ziti` both mean the `.ziti` suffix; empty turns dialing by name off."""
    suffix = (suffix or "").strip()
    if suffix and not suffix.startswith("."):
        suffix = "." + suffix
    return suffix.lower()


def service_for_host(host: str, suffix: str) -> str | None:
    """`web.ziti` -> `web` (suffix `.ziti`); None when the host does not use the suffix form."""
    host = host.rstrip(".")
    if not suffix or len(host) <= len(suffix) or not host.lower().endswith(suffix):
        return None
    return host[: -len(suffix)]


def ziti_error_code(exc: BaseException) -> int | None:
    """The Ziti error code of an SDK failure: `zitilib.check_error` raises Exception(code, message)."""
    if type(exc) is Exception and len(exc.args) == 2 and isinstance(exc.args[0], int) and exc.args[0] < 0:
        return exc.args[0]
    return None


def describe_sdk_error(exc: BaseException) -> str:
    if ziti_error_code(exc) is not None:
        return f"{exc.args[1]} (Ziti error {exc.args[0]})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _setup_errors() -> Iterator[None]:
    """Identity and enrollment problems are start-up errors: one line, exit 2."""
    try:
        yield
    except (InvalidIdentity, EnrollmentError) as exc:
        raise ZitiSetupError(str(exc)) from None


def preflight(label: str, data: bytes) -> str:
    """Check an identity before the SDK sees it (identity_check); returns its controller URL."""
    with _setup_errors():
        return check_identity(label, data)


def configured_token(settings: Any) -> EnrollmentToken | None:
    """The enrollment token of ZITI_ENROLL_TOKEN or --enroll-token-file, checked, or None."""
    text = getattr(settings, "enroll_token", None)
    path = getattr(settings, "enroll_token_file", None)
    with _setup_errors():
        if text:
            return parse_token(text, TOKEN_VARIABLE)
        if path:
            return token_from_file(path, "--enroll-token-file")
    return None


def read_identity_file(path: str, label: str) -> Identity:
    """An identity file, checked: the Identity to load, with its controller for the logs."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ZitiSetupError(f"cannot read Ziti identity {label}: {exc.strerror}") from None
    return Identity(label, os.path.abspath(path), controller=preflight(label, data))


# ----------------------------------------------------------------------------- the SDK

def import_sdk() -> Any:
    """Import `openziti` with the identity variables out of the environment; returns `openziti.zitilib`."""
    _forget_secret_variables()
    try:
        import openziti  # noqa: F401  (the package's import wires up its native library)
        from openziti import zitilib
    except ModuleNotFoundError as exc:
        if exc.name != "openziti":
            raise ZitiSetupError(f"cannot import the OpenZiti SDK ({exc}); reinstall it: {INSTALL_HINT}") from None
        raise ZitiSetupError(f"a Ziti identity is configured but the OpenZiti SDK is not installed: {INSTALL_HINT}") from None
    except (ImportError, OSError) as exc:
        raise ZitiSetupError(f"cannot load the OpenZiti SDK's native library ({exc}); reinstall it: {INSTALL_HINT}") from None
    return zitilib


def _shutdown_sdk(zitilib: Any) -> None:
    """Ziti_lib_shutdown, without letting a stuck SDK hold up the exit."""
    thread = threading.Thread(target=zitilib.shutdown, name="zep-ziti-shutdown", daemon=True)
    thread.start()
    thread.join(SHUTDOWN_WAIT)


def enroll(zitilib: Any, token: EnrollmentToken, timeout: float, setting: str) -> bytes:
    """Turn a one-time token into identity JSON with the SDK (`openziti.enroll`), within `timeout`.

    The native library can block for ever (it does on a token it cannot parse), so the call runs
    on a daemon thread that is abandoned when the time is up.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["identity"] = zitilib.enroll(token.text)
        except Exception as exc:  # the SDK raises RuntimeError(ziti_errorstr(code))
            outcome["error"] = exc

    log.info("ziti: enrolling with the token from %s (controller %s)", token.source, token.controller)
    thread = threading.Thread(target=call, name="zep-ziti-enroll", daemon=True)
    thread.start()
    thread.join(timeout)
    what = f"enrollment with the token from {token.source}"
    if thread.is_alive():
        raise ZitiSetupError(f"{what} did not finish within {timeout:g} s (controller {token.controller}; "
                             f"{setting}); the token may have been used")
    if "error" in outcome:
        message = str(outcome["error"])
        code = next((c for c in range(-1, LAST_ERROR_CODE - 1, -1) if zitilib.errorstr(c) == message), None)
        detail = f"{message} (Ziti error {code})" if code is not None else message
        hint = ENROLL_HINTS.get(code)
        raise ZitiSetupError(f"{what} failed: {detail}" + (f": {hint}" if hint else ""))
    identity = outcome["identity"]
    return identity.encode() if isinstance(identity, str) else bytes(identity)


def enroll_into(zitilib: Any, token: EnrollmentToken, output: IdentityOutput, timeout: float, setting: str) -> bytes:
    """Enroll and write the identity to the claimed output; the claim is dropped if enrolling fails."""
    try:
        data = enroll(zitilib, token, timeout, setting)
    except BaseException:
        output.discard()
        raise
    output.commit(data)  # the token is spent: keep what it bought, even if it then fails pre-flight
    return data


def enroll_to_file(token: EnrollmentToken, path: str, force: bool, timeout: float, setting: str) -> str:
    """`zep enroll`: enroll and write the identity to `path` (0600); returns its controller."""
    zitilib = import_sdk()
    try:
        with _setup_errors():
            output = IdentityOutput(path, force)
        with _sigterm_unwinds():
            data = enroll_into(zitilib, token, output, timeout, setting)
        return preflight(path, data)
    finally:
        _shutdown_sdk(zitilib)


def load_identities(zitilib: Any, identities: list[Identity], timeout: float) -> list[Identity]:
    """Load each identity, all within `timeout` seconds; the SDK returns once its services are known."""
    loaded: list[Identity] = []
    deadline = time.monotonic() + timeout
    for identity in identities:
        controller = identity.controller
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ZitiSetupError(f"Ziti identity {identity.label} was not loaded: loading identities took longer "
                                 f"than {timeout:g} s (ZEP_ZITI_LOAD_TIMEOUT)")
        handle, err = zitilib.load(identity.path, max(1, int(remaining * 1000)))
        if err == ZITI_TIMEOUT:
            raise ZitiSetupError(f"Ziti identity {identity.label} did not load within {timeout:g} s "
                                 f"(controller {controller}; ZEP_ZITI_LOAD_TIMEOUT)")
        if err != 0:
            raise ZitiSetupError(f"cannot load Ziti identity {identity.label}: {zitilib.errorstr(err)} (Ziti error {err})")
        identity = Identity(identity.label, identity.path, handle, controller)
        log.info("ziti identity loaded: %s (controller %s)", identity.label, controller)
        loaded.append(identity)
    return loaded


def start(settings: Any) -> ZitiDialer:
    """Enroll if a token is given, load the configured identities (blocking, bounded) and return the
    dialer; raises ZitiSetupError. Every identity is checked before the SDK sees it, and before
    a one-time token is spent."""
    _forget_secret_variables()
    entries = tuple(getattr(settings, "ziti_identities", ()) or ())
    encoded = getattr(settings, "ziti_identity", None)
    timeout = float(getattr(settings, "ziti_load_timeout", 30.0))
    suffix = normalize_suffix(getattr(settings, "ziti_service_suffix", ".ziti"))
    out = getattr(settings, "enroll_identity_out", None)

    identities = [read_identity_file(path, path) for path in expand_identity_entries(entries)]
    decoded = decode_identity(encoded) if encoded else None
    decoded_controller = preflight(ENCODED_LABEL, decoded) if decoded is not None else "unknown"
    token = configured_token(settings)
    if token is not None and out and os.path.exists(out):
        # Enrolled on an earlier start (the ziti-edge-tunnel container's convention): a one-time
        # token cannot be used twice, so the identity it gave is loaded instead.
        log.info("ziti: %s exists: loading it and leaving the enrollment token unused", out)
        identities.append(read_identity_file(out, out))
        token = None
    if not identities and decoded is None and token is None:
        raise ZitiSetupError("no Ziti identity is configured (ZITI_IDENTITIES, ZITI_IDENTITY, --identity "
                             "or ZITI_ENROLL_TOKEN)")
    zitilib = import_sdk()

    private: PrivateDirectory | None = None

    def private_file(name: str, data: bytes) -> str:
        nonlocal private
        private = private or PrivateDirectory()
        return private.write(name, data)

    with _sigterm_unwinds():
        try:
            if decoded is not None:
                identities.append(Identity(ENCODED_LABEL, private_file("identity.json", decoded),
                                           controller=decoded_controller))
            if token is not None:
                identities.append(_enroll_at_start(zitilib, token, out, timeout, private_file))
            loaded = load_identities(zitilib, identities, timeout)
        except BaseException:
            _shutdown_sdk(zitilib)
            if private is not None:
                private.remove()
            raise
    version = zitilib.version()
    log.info("ziti ready: %d identit%s, OpenZiti C SDK %s; services are matched by intercept address per "
             "connection (the SDK does not list them)%s", len(loaded), "y" if len(loaded) == 1 else "ies",
             _text(version.version), f", and <service>{suffix} dials a service by name" if suffix else "")
    return ZitiDialer(zitilib, loaded, suffix, private, sdk_version=_text(version.version))


async def start_in_thread(settings: Any) -> ZitiDialer:
    """start() on a thread of its own, so the event loop (the admin listener) answers while identities
    load. A daemon thread: if zep stops first, a load stuck in the SDK does not hold up the exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ZitiDialer] = loop.create_future()

    def settle(result: ZitiDialer | None, error: BaseException | None) -> None:
        if done.cancelled():  # nobody waits for it any more
            if result is not None:
                result.close()
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def load() -> None:
        result, error = None, None
        try:
            result = start(settings)
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: zep is exiting
            if result is not None:
                result.close()

    threading.Thread(target=load, name="zep-ziti-load", daemon=True).start()
    return await done


def _enroll_at_start(zitilib: Any, token: EnrollmentToken, out: str | None, timeout: float,
                     private_file: Callable[[str, bytes], str]) -> Identity:
    """The identity a token gives at start-up: kept in `out`, or in a private file for this run."""
    if out:
        with _setup_errors():
            output = IdentityOutput(out, hint=None)  # claimed before the token is spent
        data = enroll_into(zitilib, token, output, timeout, "ZEP_ZITI_LOAD_TIMEOUT")
        label = path = out
    else:
        data = enroll(zitilib, token, timeout, "ZEP_ZITI_LOAD_TIMEOUT")
        label, path = f"enrolled from {token.source}", private_file("enrolled.json", data)
    return Identity(label, os.path.abspath(path), controller=preflight(label, data))


def _forget_secret_variables() -> None:
    """Identities and tokens leave zep's environment once read, so nothing zep starts inherits them."""
    for name in SECRET_VARIABLES:
        os.environ.pop(name, None)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While start() blocks on the SDK, SIGTERM unwinds like Ctrl-C, so a decoded identity is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- the dialer

class ZitiDialer:
    """A Dialer over the loaded identities; `close()` shuts the SDK down and removes decoded files."""

    def __init__(self, zitilib: Any, identities: list[Identity], suffix: str,
                 private: PrivateDirectory | None = None, sdk_version: str = "unknown") -> None:
        self.identities = tuple(identities)
        self.suffix = suffix
        self.sdk_version = sdk_version
        self._zitilib = zitilib
        self._private = private
        self._executor = concurrent.futures.ThreadPoolExecutor(DIAL_THREADS, thread_name_prefix="zep-ziti")
        self._closed = False

    async def dial(self, host: str, port: int, timeout: float) -> Upstream | None:
        if self._closed:
            raise DialError(Failure.GENERAL, "the Ziti runtime is shut down")
        try:
            async with asyncio.timeout(timeout):
                sock = await self._call(self._connect_addr, host, port)
                route = INTERCEPT_ROUTE
                if sock is None:
                    service = service_for_host(host, self.suffix)
                    if service is None:
                        return None
                    sock = await self._call(self._connect_service, service)
                    if sock is None:
                        raise DialError(Failure.HOST_UNREACHABLE,
                                        f"no loaded Ziti identity can dial a service named {service!r}")
                    route = f"ziti:{service}"
                try:
                    await _wait_connected(sock)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise DialError(Failure.TIMEOUT, f"Ziti dial of {host}:{port} took longer than {timeout:g} s") from None
        except OSError as exc:
            raise DialError(Failure.GENERAL, f"Ziti dial of {host}:{port} failed: {describe_sdk_error(exc)}") from None
        log.debug("ziti: %s:%s via %s", host, port, route)
        return Upstream(sock, route)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        _shutdown_sdk(self._zitilib)
        if self._private is not None:
            self._private.remove()

    async def _call(self, fn: Callable[..., socket.socket | None], *args: Any) -> socket.socket | None:
        """Run a blocking SDK call on the pool; if we stop waiting, close whatever it returns later."""
        future = self._executor.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except BaseException:
            future.add_done_callback(_close_result)
            raise

    def _connect_addr(self, host: str, port: int) -> socket.socket | None:
        """Ziti_connect_addr: a socket connecting to the bridge, or None when no intercept matches."""
        return self._new_socket(lambda fd: self._zitilib.connect_addr(fd, (host, port)), f"{host}:{port}")

    def _connect_service(self, service: str) -> socket.socket | None:
        """Ziti_connect with each identity in turn: the first that has the service carries it."""
        for identity in self.identities:
            sock = self._new_socket(lambda fd: self._zitilib.connect(fd, identity.handle, service, None),
                                    f"service {service!r}")
            if sock is not None:
                return sock
        return None

    def _new_socket(self, connect: Callable[[int], None], what: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                connect(sock.fileno())
            except BlockingIOError:
                pass  # the bridge connect is in progress, as for any non-blocking socket
            except Exception as exc:
                if ziti_error_code(exc) == ZITI_SERVICE_UNAVAILABLE:
                    sock.close()
                    return None
                if isinstance(exc, OSError):
                    raise
                raise DialError(Failure.GENERAL, f"Ziti dial of {what} failed: {describe_sdk_error(exc)}") from None
            return sock
        except BaseException:
            sock.close()
            raise


def _close_result(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None and future.result() is not None:
        future.result().close()


async def _wait_connected(sock: socket.socket) -> None:
    """Wait for the non-blocking connect to the SDK's bridge to finish; raise its error if it failed."""
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        # The overlay dial already failed and the SDK closed its bridge: say so before any reply.
        raise OSError(err, f"the overlay dial failed, the SDK reset its bridge ({os.strerror(err)})")
