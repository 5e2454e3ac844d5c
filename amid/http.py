"""The operations HTTP server (``/metrics``, ``/livez``, ``/readyz``) and its CLI probe.

:class:`HealthServer` runs on the daemon's event loop (aiohttp). :func:`healthcheck` is the
client side of ``amid healthcheck`` (a container ``HEALTHCHECK`` has no curl): it uses the
standard library only and runs in the CLI process, never on the daemon's loop.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from amid.ami.address import format_host, split_host_port

__all__ = ["DEFAULT_HEALTHCHECK_URL", "HealthCheck", "HealthServer", "healthcheck", "parse_listen"]

log = logging.getLogger("amid.http")

DEFAULT_HEALTHCHECK_URL = "http://127.0.0.1:9180/readyz"

# A health check returns (ok, reasons); reasons must be JSON-serialisable (non-JSON values are
# rendered with str()). Example: (False, {"pbx1": "not logged in", "webhook": "retrying"}).
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]

# Our handlers answer in well under a second; waiting longer on close only delays shutdown.
_SHUTDOWN_TIMEOUT = 2.0
# A health body is small JSON; read at most this much of it when probing.
_MAX_PROBE_BODY = 64 * 1024


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[v6 address]:port"`` into ``(host, port)``.

    Port 0 asks the OS for a free port. Raises ValueError naming the problem otherwise.
    """
    if not listen.startswith("[") and listen.count(":") > 1:
        raise ValueError(f"listen {listen!r}: put an IPv6 address in brackets, e.g. [::1]:9180")
    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        raise ValueError(f"listen {listen!r}: {exc} (expected host:port, a port from 0 to 65535)") from None
    if port is None:
        raise ValueError(f"listen {listen!r}: expected host:port or [address]:port")
    if not host:
        raise ValueError(f"listen {listen!r}: missing host (use 0.0.0.0 or [::] for every interface)")
    return host, port


class HealthServer:
    """aiohttp server for ``/metrics`` (from ``registry``), ``/livez`` and ``/readyz``.

    ``live`` and ``ready`` are called on every request to their endpoint and return
    ``(ok, reasons)``; the response is ``{"status": "ok"|"fail", "checks": reasons}`` with
    HTTP 200 when ok, else 503. Access logging is off: probes every few seconds would flood it.
    """

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        *,
        live: HealthCheck,
        ready: HealthCheck,
    ) -> None:
        self._host, self._port = parse_listen(listen)  # fail on bad input before start()
        self._registry = registry
        self._live = live
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with a listen port of 0)."""
        if self._bound_port is None:
            raise RuntimeError("HealthServer is not started")
        return self._bound_port

    async def start(self) -> None:
        """Bind and start serving. Raises OSError if the address cannot be bound."""
        if self._runner is not None:
            raise RuntimeError("HealthServer already started")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", functools.partial(self._health, self._live))
        app.router.add_get("/readyz", functools.partial(self._health, self._ready))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = runner.addresses[0][1]
        log.info("metrics and health on http://%s:%d/metrics, /livez, /readyz",
                 format_host(self._host), self._bound_port)

    async def close(self) -> None:
        """Stop serving and release the socket. Idempotent."""
        runner, self._runner = self._runner, None
        self._bound_port = None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        # Serve OpenMetrics when the scraper asks for it, the classic text format otherwise.
        # Rendering is CPU-bound but takes about a millisecond for our metric count.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(self._registry), headers={"Content-Type": content_type})
        response.enable_compression()  # only if the client sent Accept-Encoding
        return response

    async def _health(self, check: HealthCheck, request: web.Request) -> web.Response:
        try:
            ok, reasons = check()
        except Exception as exc:  # a broken check must report "fail", not crash the endpoint
            log.exception("health check %s raised", request.path)
            ok, reasons = False, {"error": f"health check raised {type(exc).__name__}: {exc}"}
        return web.json_response(
            {"status": "ok" if ok else "fail", "checks": reasons},
            status=200 if ok else 503,
            headers={"Cache-Control": "no-store"},
            dumps=functools.partial(json.dumps, default=str),
        )


def healthcheck(
    url: str = DEFAULT_HEALTHCHECK_URL, timeout: float = 3.0, *, out: TextIO | None = None
) -> int:
    """Probe a health endpoint: return 0 if it answers HTTP 200, else 1.

    Blocking (standard library only): meant for ``amid healthcheck``, not for the event loop.
    If ``out`` is given, the response body or the connection error is written to it, so
    ``docker inspect`` shows why a container is unhealthy.
    """
    try:
        status, body = _get(url, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if out is not None:
            print(f"{url}: {reason}", file=out)
        return 1
    if out is not None:
        print(f"{url}: HTTP {status} {body.decode('utf-8', 'replace').strip()}", file=out)
    return 0 if status == 200 else 1


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET ``url``: (status, start of body) for any HTTP answer, including 4xx/5xx."""
    # Ignore HTTP(S)_PROXY: the probe targets the daemon on this host, never a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read(_MAX_PROBE_BODY)
    except urllib.error.HTTPError as exc:  # non-2xx: the body still says why
        with exc:
            return exc.code, exc.read(_MAX_PROBE_BODY)
