"""amid.http: /metrics, /livez, /readyz over real sockets, and the healthcheck probe."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from promparse import key, parse

from amid.http import HealthServer, healthcheck, parse_listen

TIMEOUT = 5.0


class Checks:
    """Mutable health state the server reports."""

    def __init__(self) -> None:
        self.live: tuple[bool, dict[str, Any]] = (True, {"loop": "ok"})
        self.ready: tuple[bool, dict[str, Any]] = (False, {"pbx1": "not logged in"})

    def get_live(self) -> tuple[bool, dict[str, Any]]:
        return self.live

    def get_ready(self) -> tuple[bool, dict[str, Any]]:
        return self.ready


def small_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("amid_test_things", "Things counted by the test.", registry=registry).inc(3)
    return registry


@pytest.fixture
def checks() -> Checks:
    return Checks()


@pytest.fixture
async def server(checks: Checks) -> AsyncIterator[HealthServer]:
    server = HealthServer("127.0.0.1:0", small_registry(), live=checks.get_live, ready=checks.get_ready)
    await server.start()
    yield server
    await server.close()


async def get(port: int, path: str, host: str = "127.0.0.1", **headers: str) -> tuple[int, dict, bytes]:
    async with asyncio.timeout(TIMEOUT), aiohttp.ClientSession() as session, \
            session.get(f"http://{host}:{port}{path}", headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- /metrics ------------------------------------------------------------------------------

async def test_metrics_serves_the_registry_in_text_format(server: HealthServer) -> None:
    status, headers, body = await get(server.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert parse(body.decode())[key("amid_test_things_total")] == 3


async def test_metrics_serves_openmetrics_when_asked(server: HealthServer) -> None:
    status, headers, body = await get(
        server.port, "/metrics", Accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_metrics_are_compressed_when_the_client_accepts_gzip(server: HealthServer) -> None:
    _, headers, _ = await get(server.port, "/metrics", **{"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"


async def test_unknown_path_is_404(server: HealthServer) -> None:
    status, _, _ = await get(server.port, "/nope")
    assert status == 404


async def test_no_access_log(server: HealthServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        await get(server.port, "/metrics")
        await get(server.port, "/readyz")
    assert not [r for r in caplog.records if r.name.startswith("aiohttp.access")]


# -- /livez and /readyz --------------------------------------------------------------------

async def test_health_endpoints_report_status_and_reasons(server: HealthServer, checks: Checks) -> None:
    status, headers, body = await get(server.port, "/livez")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"status": "ok", "checks": {"loop": "ok"}}

    status, _, body = await get(server.port, "/readyz")
    assert status == 503
    assert json.loads(body) == {"status": "fail", "checks": {"pbx1": "not logged in"}}

    checks.ready = (True, {"pbx1": "logged in"})
    status, _, body = await get(server.port, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "checks": {"pbx1": "logged in"}}

    checks.live = (False, {"reader": "no progress for 45 s"})
    status, _, body = await get(server.port, "/livez")
    assert status == 503
    assert json.loads(body)["checks"] == {"reader": "no progress for 45 s"}


async def test_a_raising_check_reports_fail(checks: Checks) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("boom")

    server = HealthServer("127.0.0.1:0", small_registry(), live=checks.get_live, ready=broken)
    await server.start()
    try:
        status, _, body = await get(server.port, "/readyz")
    finally:
        await server.close()
    assert status == 503
    payload = json.loads(body)
    assert payload["status"] == "fail"
    assert "boom" in payload["checks"]["error"]


async def test_non_json_reasons_are_rendered_as_text(server: HealthServer, checks: Checks) -> None:
    checks.ready = (False, {"since": RuntimeError("refused")})
    status, _, body = await get(server.port, "/readyz")
    assert (status, json.loads(body)["checks"]) == (503, {"since": "refused"})


# -- lifecycle -----------------------------------------------------------------------------

async def test_close_releases_the_port_and_is_idempotent(checks: Checks) -> None:
    server = HealthServer("127.0.0.1:0", small_registry(), live=checks.get_live, ready=checks.get_ready)
    await server.start()
    port = server.port
    await server.close()
    await server.close()
    with pytest.raises(RuntimeError):
        server.port
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(port, "/livez")


async def test_start_on_a_busy_port_raises(checks: Checks) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = HealthServer(
            f"127.0.0.1:{port}", small_registry(), live=checks.get_live, ready=checks.get_ready
        )
        with pytest.raises(OSError):
            await server.start()
        await server.close()


async def test_ipv6_listen(checks: Checks) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = HealthServer("[::1]:0", small_registry(), live=checks.get_live, ready=checks.get_ready)
    await server.start()
    try:
        status, _, _ = await get(server.port, "/livez", host="[::1]")
    finally:
        await server.close()
    assert status == 200


@pytest.mark.parametrize(("listen", "expected"), [
    ("127.0.0.1:9180", ("127.0.0.1", 9180)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:9180", ("::1", 9180)),
    ("[::]:80", ("::", 80)),
])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", [
    "9180", "127.0.0.1", ":9180", "::1:9180", "[::1]9180", "[::1",
    "host:port", "host:70000", "host:-1", "[]:80",
])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)


# -- healthcheck() (blocking: run in a thread, since the server lives on this loop) ----------

async def run_healthcheck(url: str) -> tuple[int, str]:
    out = io.StringIO()
    async with asyncio.timeout(TIMEOUT):
        code = await asyncio.to_thread(healthcheck, url, 2.0, out=out)
    return code, out.getvalue()


async def test_healthcheck_exit_codes(
    server: HealthServer, checks: Checks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy in the environment must not be used for a probe of the local daemon.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    url = f"http://127.0.0.1:{server.port}/readyz"

    code, output = await run_healthcheck(url)
    assert code == 1
    assert "503" in output and "not logged in" in output

    checks.ready = (True, {"pbx1": "logged in"})
    code, output = await run_healthcheck(url)
    assert code == 0
    assert "200" in output

    assert (await run_healthcheck(f"http://127.0.0.1:{server.port}/missing"))[0] == 1


async def test_healthcheck_fails_on_a_closed_port() -> None:
    code, output = await run_healthcheck(f"http://127.0.0.1:{closed_port()}/readyz")
    assert code == 1
    assert output  # says why


def test_healthcheck_fails_on_a_malformed_url() -> None:
    assert healthcheck("not a url", 1.0) == 1
