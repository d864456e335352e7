"""One HTTP port: ``/metrics``, ``/healthz`` (loops alive) and ``/readyz`` (initial lists done).

It is handed callables by app.py and imports neither the informers nor the workers, so what it
reports is whatever app.py defines as alive and ready. No profiling or debug endpoints: Stakater's
metrics port also serves pprof, which leaks flags and burns CPU on request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("reloader.http")
Probe = Callable[[], tuple[bool, str]]
"""Returns (ok, one line of detail)."""


def build_app(*, registry: CollectorRegistry, healthy: Probe, ready: Probe) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def probe(check: Probe) -> Callable[[web.Request], object]:
        async def handler(_: web.Request) -> web.Response:
            ok, detail = check()
            return web.Response(status=200 if ok else 503, text=detail + "\n")

        return handler

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", probe(healthy))  # type: ignore[arg-type]
    app.router.add_get("/readyz", probe(ready))  # type: ignore[arg-type]
    app.router.add_get("/live", probe(healthy))  # type: ignore[arg-type]  # Stakater's path
    return app


async def serve(app: web.Application, *, host: str, port: int) -> web.AppRunner:
    """Start listening; returns the runner (its ``addresses`` tell the bound port when 0).

    ``host`` empty means every address, IPv4 and IPv6, as Go's ``:9090`` does for Stakater: an
    IPv6-only or dual-stack cluster probes the pod on its IPv6 address. The two sockets share one
    port (IPv6 socket with ``IPV6_V6ONLY``); a node without IPv6 keeps IPv4 and logs why.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=host or "0.0.0.0", port=port)
    await site.start()
    if not host:
        await _serve_ipv6_too(runner, port=bound_port(runner))
    return runner


async def _serve_ipv6_too(runner: web.AppRunner, *, port: int) -> None:
    try:
        await web.TCPSite(runner, host="::", port=port).start()
    except OSError as error:  # IPv6 disabled on the node or in the pod's network namespace
        log.warning("not listening on IPv6", extra={"port": port, "error": str(error)})


def bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])
