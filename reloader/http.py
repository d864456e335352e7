"""One HTTP port: ``/metrics``, ``/healthz`` (loops alive) and ``/readyz`` (initial lists done).

It is handed callables by app.py and imports neither the informers nor the workers, so what it
reports is whatever app.py defines as alive and ready. No profiling or debug endpoints: Stakater's
metrics port also serves pprof, which leaks flags and burns CPU on request.

The port is reachable by anything in the cluster network, so a client cannot hold it hostage:
request heads are bounded (``HEAD_LIMITS``), bodies refused past ``MAX_BODY_BYTES`` (no endpoint
takes one), and a request head must arrive within ``HEAD_TIMEOUT`` seconds of its first byte (or
of the connection opening). aiohttp has no such deadline of its own: a client sending its headers
a byte a minute (slow loris) would keep a connection, a file descriptor and a parser for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("reloader.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Probe = Callable[[], tuple[bool, str]]
"""Returns (ok, one line of detail)."""

HEAD_TIMEOUT = 10.0
"""Seconds a request head (request line and headers) may take to arrive. A probe or a scrape sends
it in one packet; Prometheus' default scrape timeout is 10 s."""
HEAD_LIMITS: dict[str, Any] = {
    "max_line_size": 4096,
    "max_field_size": 4096,
    "max_headers": 32,
    "keepalive_timeout": 75.0,
}
"""aiohttp's request-head bounds (a head over them is answered 400) and the idle keep-alive time
(aiohttp's default is an hour). 32 headers of 4 KiB: a scrape sends five, a kubelet probe three."""
MAX_BODY_BYTES = 1024
"""``client_max_size``: every endpoint is a GET; a larger body is answered 413."""
_HEAD_END = b"\r\n\r\n"


def build_app(*, registry: CollectorRegistry, healthy: Probe, ready: Probe) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def probe(check: Probe) -> Callable[[web.Request], object]:
        async def handler(_: web.Request) -> web.Response:
            ok, detail = check()
            return web.Response(status=200 if ok else 503, text=detail + "\n")

        return handler

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_refuse_bodies])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", probe(healthy))  # type: ignore[arg-type]
    app.router.add_get("/readyz", probe(ready))  # type: ignore[arg-type]
    app.router.add_get("/live", probe(healthy))  # type: ignore[arg-type]  # Stakater's path
    return app


@web.middleware
async def _refuse_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """413 and close for a body over ``MAX_BODY_BYTES``, or of unknown length, before the handler.

    ``client_max_size`` alone binds only a handler that reads the body, and none does: aiohttp
    would then read and discard whatever the client sends for up to ten seconds (lingering)."""
    if request.body_exists and (request.content_length or MAX_BODY_BYTES + 1) > MAX_BODY_BYTES:
        response = web.Response(status=413, text="no request body is accepted here\n")
        response.force_close()
        return response
    return await handler(request)


async def serve(
    app: web.Application, *, host: str, port: int, head_timeout: float = HEAD_TIMEOUT
) -> web.AppRunner:
    """Start listening; returns the runner (its ``addresses`` tell the bound port when 0).

    ``host`` empty means every address, IPv4 and IPv6, as Go's ``:9090`` does for Stakater: an
    IPv6-only or dual-stack cluster probes the pod on its IPv6 address. The two sockets share one
    port (IPv6 socket with ``IPV6_V6ONLY``); a node without IPv6 keeps IPv4 and logs why.
    """
    runner = _Runner(app, head_timeout=head_timeout, access_log=None, **HEAD_LIMITS)
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


class _Runner(web.AppRunner):
    """An ``AppRunner`` whose connections each get a ``_HeadDeadline``."""

    def __init__(self, app: web.Application, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return cast(web.Server, _GuardedServer(server, self._head_timeout))


class _GuardedServer:
    """aiohttp's ``Server`` (the protocol factory every site listens with), each protocol wrapped.

    Everything but the factory call is the real server's, so shutdown and connection tracking are
    aiohttp's own."""

    def __init__(self, server: web.Server, head_timeout: float) -> None:
        self._server = server
        self._head_timeout = head_timeout

    def __call__(self) -> asyncio.Protocol:
        return _HeadDeadline(self._server(), self._head_timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _HeadDeadline(asyncio.Protocol):
    """Closes a connection whose request head takes longer than ``timeout`` to arrive.

    The clock starts when the connection opens and whenever a byte arrives with no head in
    progress; it stops at the blank line that ends a head. Only the end of a head is looked for
    (these endpoints take no body), so aiohttp's parser stays the only one that reads requests.
    """

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._tail = b""
        """The last bytes seen, so a head end split across two reads is still found."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        seen = self._tail + data
        end = seen.rfind(_HEAD_END)
        if end < 0:
            self._arm()
        elif end + len(_HEAD_END) == len(seen):
            self._disarm()
        else:  # a head ended, and the next (pipelined) one began: its own clock
            self._disarm()
            self._arm()
        self._tail = seen[-(len(_HEAD_END) - 1) :]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _arm(self) -> None:
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._transport is not None:
            log.debug(
                "closed a connection whose request head was too slow",
                extra={"seconds": self._timeout},
            )
            self._transport.close()
