"""Proxy variables that point at zep itself are removed before the Ziti SDK is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.upstreams import Upstream, closed_port
from tests.support.zepproc import start_zep
from tests.support.ziti import openziti_path, service, standin_library, write_identity  # noqa: F401  (fixtures)
from zep.proxy_env import PROXY_VARIABLES, proxy_endpoint, remove_self_proxies

SECRET = "proxy-env-s3cret"


@pytest.mark.parametrize(("value", "endpoint"), [
    ("http://127.0.0.1:8080", ("127.0.0.1", 8080)),
    (f"http://ci:{SECRET}@LOCALHOST:8080/", ("localhost", 8080)),
    ("127.0.0.1:1080", ("127.0.0.1", 1080)),
    ("socks5h://[::1]", ("::1", 1080)),
    ("http://corp-proxy", ("corp-proxy", 80)),
    ("", None),
    ("http://:99999", None),
])
def test_proxy_endpoint(value, endpoint):
    assert proxy_endpoint(value) == endpoint


def test_only_variables_naming_zep_are_removed(caplog):
    environ = {
        "http_proxy": f"http://ci:{SECRET}@127.0.0.1:8080",
        "HTTPS_PROXY": "http://localhost:8080",
        "all_proxy": "socks5h://[::1]:1080",
        "ALL_PROXY": "socks5h://127.0.0.1:1081",  # another port: not zep
        "HTTP_PROXY": "http://corp-proxy:8080",  # another host
        "https_proxy": "http://127.0.0.1:8080",
    }
    with caplog.at_level("WARNING", logger="zep"):
        removed = remove_self_proxies(environ, "127.0.0.1", [1080, 8080])
    assert removed == ["http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy"]
    assert environ == {"ALL_PROXY": "socks5h://127.0.0.1:1081", "HTTP_PROXY": "http://corp-proxy:8080"}
    assert [record.getMessage().split(" ")[1] for record in caplog.records] == removed
    assert SECRET not in caplog.text and "ci:" not in caplog.text


def test_wildcard_and_specific_listen_addresses():
    assert remove_self_proxies({"http_proxy": "http://127.0.0.1:3128"}, "0.0.0.0", [3128]) == ["http_proxy"]
    assert remove_self_proxies({"http_proxy": "http://10.0.0.5:3128"}, "10.0.0.5", [3128]) == ["http_proxy"]
    assert remove_self_proxies({"http_proxy": "http://127.0.0.1:3128"}, "10.0.0.5", [3128]) == []
    assert remove_self_proxies({"http_proxy": "http://127.0.0.1:3128"}, "127.0.0.1", [0]) == []
    assert set(PROXY_VARIABLES) == {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"}


def test_the_ziti_library_never_sees_a_proxy_variable_pointing_at_zep(tmp_path: Path, openziti_path: Path,
                                                                      http_b: Upstream) -> None:
    identity = write_identity(tmp_path / "id.json", [service("web-b", ["b.example.test"], ["80"], f"127.0.0.1:{http_b.port}")])
    http_port = closed_port()
    env = {
        "ZITI_IDENTITIES": str(identity), "ZITI_LOG": "3", "HTTP_PORT": str(http_port),
        "http_proxy": f"http://ci:{SECRET}@127.0.0.1:{http_port}", "HTTPS_PROXY": f"http://localhost:{http_port}",
        "ALL_PROXY": "socks5h://corp-gateway.example:1080",
    }
    with start_zep("--host", "127.0.0.1", "--socks-port", "0", env=env, extra_pythonpath=[str(openziti_path)],
                   default_args=False) as zp:
        assert zp.http_port == http_port
        line = zp.wait_for_log("proxy variables seen by the library:")
        assert line.endswith("library: ALL_PROXY")
        for name in ("http_proxy", "HTTPS_PROXY"):
            assert "zep itself" in zp.wait_for_log(f"removed {name} from zep's environment")
    assert SECRET not in zp.log_text()
