"""A loopback HTTP proxy in front of the real API server, for fault tests.

The client under test (the controller, in process or as a child process) speaks plain HTTP to
``127.0.0.1:<free port>``; the proxy sends every request on over TLS to the real API server with
the credentials of a kubeconfig (a client certificate or a token), and passes the answer back. Since
the proxy ends the HTTP exchange itself, it can do to any request what a real network or an
overloaded server does, and everything else stays real: the requests reach the real server, and the
client gets real HTTP answers and real broken sockets.

- **forward** (default): every request and every watch stream passes through, chunk by chunk.
- **faults**: ``add_fault(Fault(...))`` answers matching requests (by method, path, watch or not,
  the first N, a fraction) with a status of its choosing (429 with ``Retry-After``, 500, 503; the
  body is a Kubernetes ``Status``), or holds them for ``delay`` seconds before passing them on.
- **silence**: the watch streams open now stop delivering, without being closed (a half-open TCP
  connection, a stuck middlebox); new requests still pass.
- **blackhole**: nothing is answered until ``restore()``; open streams are silenced too.
- **reset**: every open client connection is aborted (the client sees a reset mid-stream).

Every request is counted by (method, request class), for example ``("GET", "watch configmaps")`` or
``("PATCH", "patch deployments")``, and each answer is kept in ``log`` with its time and status, so
tests can show that a client backs off (a bounded number of requests) instead of spinning.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from kubernetes_asyncio import client

from reloader.kube import Api

NO_ANSWER = 0
"""Status logged for a request the client got no HTTP answer to (reset, upstream down)."""
FORWARDED_HEADERS = ("Accept", "Content-Type", "User-Agent")


@dataclass
class Fault:
    """What to do to the requests it matches; the first matching fault of the proxy applies.

    ``status`` answers instead of forwarding (None: forward, after ``delay``). ``times`` limits it
    to the first N matches, ``fraction`` to a random share of them.
    """

    status: int | None = None
    delay: float = 0.0
    retry_after: int | None = None
    methods: frozenset[str] = frozenset()
    path_contains: str = ""
    watches: bool | None = False
    """True: only watch requests; False (default): never watches; None: both."""
    fraction: float = 1.0
    times: int | None = None
    matched: int = 0

    def matches(self, method: str, path: str, watch: bool) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path_contains not in path:
            return False
        if self.watches is not None and watch != self.watches:
            return False
        if self.times is not None and self.matched >= self.times:
            return False
        if random.random() >= self.fraction:
            return False
        self.matched += 1
        return True


@dataclass(frozen=True)
class Answer:
    """One request as the proxy saw it: when, what, and the status the client got."""

    at: float
    method: str
    request_class: str
    status: int
    path: str


def request_class(method: str, path: str, watch: bool) -> str:
    """``"<verb> <resource>"``: the API verb and the resource plural a request path names."""
    parts = [p for p in path.split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    resource, named = (rest[0], len(rest) > 1) if rest else ("", False)
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    verbs = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
    verb = verbs.get(method) or ("watch" if watch else "get" if named else "list")
    return f"{verb} {resource}"


def status_body(status: int, message: str) -> bytes:
    """A Kubernetes ``Status`` object, as the API server sends with an error."""
    reasons = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reasons.get(status, "Unknown"),
        "code": status,
    }
    return orjson.dumps(body)


def upstream_ssl(kubeconfig: Mapping[str, Any]) -> tuple[str, ssl.SSLContext, dict[str, str]]:
    """The server URL, a TLS context (CA and client certificate) and auth headers of the current
    context of ``kubeconfig``; ``*-data`` fields and file paths are both read."""
    context_name = kubeconfig["current-context"]
    context = next(c for c in kubeconfig["contexts"] if c["name"] == context_name)["context"]
    cluster = next(c for c in kubeconfig["clusters"] if c["name"] == context["cluster"])["cluster"]
    user = next(u for u in kubeconfig["users"] if u["name"] == context["user"])["user"]

    def pem(data_key: str, file_key: str) -> bytes | None:
        if data_key in user or data_key in cluster:
            return base64.b64decode((user | cluster)[data_key])
        path = user.get(file_key) or cluster.get(file_key)
        return Path(path).read_bytes() if path else None

    tls = ssl.create_default_context()
    ca = pem("certificate-authority-data", "certificate-authority")
    if cluster.get("insecure-skip-tls-verify"):
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    elif ca is not None:
        tls.load_verify_locations(cadata=ca.decode())
    cert, key = (
        pem("client-certificate-data", "client-certificate"),
        pem("client-key-data", "client-key"),
    )
    if cert is not None and key is not None:
        with tempfile.TemporaryDirectory() as directory:
            cert_path, key_path = Path(directory, "tls.crt"), Path(directory, "tls.key")
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)
            tls.load_cert_chain(cert_path, key_path)
    headers = {"Authorization": f"Bearer {user['token']}"} if user.get("token") else {}
    return str(cluster["server"]).rstrip("/"), tls, headers


@dataclass
class FaultProxy:
    """The proxy; ``async with FaultProxy(kubeconfig) as proxy`` serves it, ``proxy.api()`` is a
    client of it. See the module docstring for the modes."""

    kubeconfig: Mapping[str, Any]
    faults: list[Fault] = field(default_factory=list)
    log: list[Answer] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._server, self._tls, self._auth = upstream_ssl(self.kubeconfig)
        self._open = asyncio.Event()
        self._open.set()
        self._silenced: set[asyncio.Event] = set()
        self._streams: dict[asyncio.Event, web.Request] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._apis: list[Api] = []
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        connector = aiohttp.TCPConnector(ssl=self._tls, limit=0)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for api in self._apis:
            await api.close()
        self.restore()
        self.silence()
        self.reset()
        deadline = time.monotonic() + 5
        while self._streams and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # each handler sees its client gone and returns
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def api(self) -> Api:
        """A client of the proxy (no credentials: the proxy adds its own); closed on exit."""
        api = Api(client.Configuration(host=self.url))
        self._apis.append(api)
        return api

    def kubeconfig_for_clients(self) -> dict[str, Any]:
        """A kubeconfig pointing at the proxy, for a child process."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "proxy", "user": {"token": "unused-the-proxy-authenticates"}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        }

    # --- modes ----------------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def silence(self) -> int:
        """Stop delivering on every watch stream open now, keeping it open; returns how many."""
        for silenced in self._streams:
            silenced.set()
        return len(self._streams)

    def blackhole(self) -> None:
        """Answer nothing (hold new requests) and silence the open streams until ``restore``."""
        self._open.clear()
        self.silence()

    def restore(self) -> None:
        self._open.set()

    def reset(self) -> int:
        """Abort every open stream's client connection; returns how many."""
        aborted = 0
        for request in list(self._streams.values()):
            if request.transport is not None:
                request.transport.abort()
                aborted += 1
        return aborted

    # --- reading the record ---------------------------------------------------------------------

    def count(
        self,
        *,
        method: str | None = None,
        contains: str = "",
        status: int | None = None,
        since: float = 0.0,
        until: float = float("inf"),
    ) -> int:
        """Answers matching every given filter (``contains`` is matched on the request class)."""
        return sum(
            1
            for a in self.log
            if (method is None or a.method == method)
            and contains in a.request_class
            and (status is None or a.status == status)
            and since <= a.at < until
        )

    # --- the handler ----------------------------------------------------------------------------

    def _record(self, request: web.Request, kind: str, status: int) -> None:
        self.log.append(Answer(time.monotonic(), request.method, kind, status, request.path))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "1")
        kind = request_class(request.method, request.path, watch)
        self.requests[(request.method, kind)] += 1
        await self._open.wait()
        fault = next(
            (f for f in self.faults if f.matches(request.method, request.path, watch)), None
        )
        if fault is not None:
            await asyncio.sleep(fault.delay)
            if fault.status is not None:
                self._record(request, kind, fault.status)
                headers = {"Content-Type": "application/json"}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                body = status_body(fault.status, f"injected by the fault proxy ({kind})")
                return web.Response(status=fault.status, body=body, headers=headers)
        return await self._forward(request, kind, watch)

    async def _forward(self, request: web.Request, kind: str, watch: bool) -> web.StreamResponse:
        assert self._session is not None
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
        timeout = aiohttp.ClientTimeout(total=None if watch else 60, sock_read=None)
        try:
            upstream = await self._session.request(
                request.method,
                self._server + request.path_qs,
                headers={**headers, **self._auth},
                data=await request.read(),
                timeout=timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return self._abort(request, kind)
        async with upstream:
            content_type = upstream.headers.get("Content-Type", "application/json")
            if not watch or upstream.status != 200:
                try:
                    body = await upstream.read()
                except (aiohttp.ClientError, OSError, TimeoutError):
                    return self._abort(request, kind)
                self._record(request, kind, upstream.status)
                return web.Response(
                    status=upstream.status, body=body, headers={"Content-Type": content_type}
                )
            self._record(request, kind, upstream.status)
            return await self._stream(request, upstream, content_type)

    def _abort(self, request: web.Request, kind: str) -> web.StreamResponse:
        """No answer from upstream: the client gets no answer either (a broken connection)."""
        self._record(request, kind, NO_ANSWER)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=502)  # never reaches the client: its connection is gone

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, content_type: str
    ) -> web.StreamResponse:
        """Pass a watch on chunk by chunk until either side ends it or the proxy silences it."""
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        silenced = asyncio.Event()
        self._streams[silenced] = request
        try:
            broken = await _pass_on(upstream, response, silenced)
            if silenced.is_set():
                upstream.close()
                await _until_client_leaves(request)
            elif broken and request.transport is not None:
                request.transport.abort()  # upstream broke: so does the client's stream
            else:
                with contextlib.suppress(ConnectionResetError):
                    await response.write_eof()
        finally:
            self._streams.pop(silenced, None)
        return response


async def _pass_on(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, silenced: asyncio.Event
) -> bool:
    """Copy until upstream ends the body or ``silenced`` is set; True if the copy broke."""
    pump = asyncio.create_task(_pump(upstream, response))
    hush = asyncio.create_task(silenced.wait())
    try:
        await asyncio.wait({pump, hush}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, hush):
            task.cancel()
        await asyncio.gather(pump, hush, return_exceptions=True)
    return not pump.cancelled() and pump.exception() is not None


async def _pump(upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
    """Copy upstream's body to the client as it arrives, until upstream ends it."""
    while chunk := await upstream.content.readany():
        await response.write(chunk)


async def _until_client_leaves(request: web.Request) -> None:
    """Hold a silenced stream open, sending nothing, until the client gives up on it."""
    while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(0.1)
