"""The only module that talks HTTP to the API server.

kubernetes_asyncio provides configuration (in-cluster, kubeconfig, token refresh) and the aiohttp
session; requests are issued raw and bodies decoded with orjson, because building the generated
model objects for every watched object is the slowest part of that client and the controller
needs plain dicts anyway.

Every failed request is classified once, here, into this tree (``__cause__`` keeps the original)::

    ApiError                  status, reason, message from the Status body
    ├── ApiGone               410: resourceVersion too old; the informer relists
    ├── ApiConflict           409: object changed since read; retried through the queue
    ├── ApiTooManyRequests    429: throttled; retried with backoff, never before Retry-After
    ├── ApiForbidden          403: RBAC; reported, retried slowly
    ├── ApiNotFound           404: object gone; absorbed by callers
    ├── ApiInvalid            422/400: our request is wrong; not retried
    ├── ApiServerError        5xx: retried
    └── ApiUnavailable        no HTTP answer (connection refused, reset, timeout); retried

Error messages come from the server's Status ``message``; Secret values never reach a request or a
response this module handles as text (Secrets are only read through watch/list bodies, which are
decoded straight into dicts and handed to the transform).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import math
import os
import sys
from asyncio import sslproto
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from reloader.model import FIELD_MANAGER, RawObject, RawWatchEvent
from reloader.pages import ListPage

_DEFERRED_PACKAGES = (
    "kubernetes_asyncio",
    "kubernetes_asyncio.client",
    "kubernetes_asyncio.client.models",
)
_USED_CLIENT_MODULES = (  # in dependency order: each one's imports are already loaded
    "kubernetes_asyncio.client.exceptions",
    "kubernetes_asyncio.client.configuration",
    "kubernetes_asyncio.client.rest",
    "kubernetes_asyncio.client.api_client",
)


def _defer_package(name: str) -> None:
    """Register package ``name`` without running its ``__init__``, until a missing name is read.

    ``kubernetes_asyncio/__init__.py`` imports ``client``, whose ``__init__`` imports every
    generated API and model class: about 1 s and 33 MiB of RSS that the controller never uses (it
    sends raw requests and decodes with orjson). Its submodules still import normally through the
    package's ``__path__``. The first read of a name the package does not have yet (another user
    of kubernetes_asyncio in the same process, say ``client.CoreV1Api``) runs the real
    ``__init__`` into the same module object, so that user gets the whole package as usual.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(name)
    loader = spec.loader
    module = importlib.util.module_from_spec(spec)

    def complete(attribute: str) -> Any:
        del module.__dict__["__getattr__"]
        loader.exec_module(module)
        return getattr(module, attribute)

    module.__dict__["__getattr__"] = complete
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def _defer_generated_client() -> None:
    """Load kubernetes_asyncio's configuration, session and config loading, not its generated API.

    When the package is already imported (a test, the bench), it is used as it is.
    """
    if "kubernetes_asyncio" in sys.modules:
        return
    for package in _DEFERRED_PACKAGES:
        _defer_package(package)
    for module in _USED_CLIENT_MODULES:
        importlib.import_module(module)
    # What the config loaders import by name from the (deferred) client package.
    client_package = sys.modules["kubernetes_asyncio.client"]
    client_package.__dict__["Configuration"] = sys.modules[_USED_CLIENT_MODULES[1]].Configuration
    client_package.__dict__["ApiClient"] = sys.modules[_USED_CLIENT_MODULES[3]].ApiClient


_defer_generated_client()
from kubernetes_asyncio.client.api_client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402
from kubernetes_asyncio.config import (  # noqa: E402
    load_incluster_config,
    load_kube_config,
    load_kube_config_from_dict,
)
from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: E402

PatchType = Literal["strategic", "merge", "json"]
_PATCH_CONTENT_TYPES: dict[PatchType, str] = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
}
USER_AGENT = "reloader/0.1"
LIST_PAGES_IN_FLIGHT = 3


class ApiError(Exception):
    """A request failed; ``status`` is the HTTP code (0 when there was no answer).

    ``retry_after``: seconds the server asked the client to wait before trying again (a 429 or
    503 from API Priority and Fairness, in the ``Retry-After`` header or the Status body's
    ``details.retryAfterSeconds``), at most ``MAX_RETRY_AFTER``; None when it asked nothing.
    Whoever retries waits at least that long, as client-go does."""

    retryable = True

    def __init__(
        self, status: int, reason: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


MAX_RETRY_AFTER = 60.0
"""The longest wait a server's ``Retry-After`` can impose: a broken proxy answering
``Retry-After: 86400`` must not stall a watch or a restart for a day."""


def wait_before_retry(error: ApiError, backoff: float) -> float:
    """The client's own backoff, or what the server asked for if that is longer."""
    return max(backoff, error.retry_after or 0.0)


def _retry_after(header: str | None, status_body: Mapping[str, Any]) -> float | None:
    """Seconds from ``Retry-After`` (the delay form; an HTTP date is not sent by the API server)
    or else from ``details.retryAfterSeconds``; None when neither holds a usable number."""
    details = status_body.get("details")
    suggested = details.get("retryAfterSeconds") if isinstance(details, dict) else None
    for value in (header, suggested):
        try:
            seconds = float(str(value)) if value is not None else math.nan
        except ValueError:
            continue
        if seconds >= 0:  # NaN (absent, "nan") is not
            return min(seconds, MAX_RETRY_AFTER)
    return None


class ApiGone(ApiError):
    pass


class ApiConflict(ApiError):
    pass


class ApiTooManyRequests(ApiError):
    pass


class ApiForbidden(ApiError):
    pass


class ApiNotFound(ApiError):
    retryable = False


class ApiInvalid(ApiError):
    retryable = False


class ApiServerError(ApiError):
    pass


class ApiUnavailable(ApiError):
    pass


class PageTooLarge(Exception):
    """A list page's body grew past the size the caller allowed; it was dropped unread and its
    connection closed. Not an API error: the same request with a smaller ``limit`` succeeds."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(f"list page over {max_bytes} bytes (dropped at {size})")
        self.size = size
        self.max_bytes = max_bytes


_BY_STATUS: dict[int, type[ApiError]] = {
    400: ApiInvalid,
    403: ApiForbidden,
    404: ApiNotFound,
    409: ApiConflict,
    410: ApiGone,
    422: ApiInvalid,
    429: ApiTooManyRequests,
}


def classify(
    status: int,
    body: bytes | bytearray | Mapping[str, Any] | None,
    *,
    retry_after: str | None = None,
) -> ApiError:
    """Map a status code and a (possibly absent) Status body to the error tree; ``retry_after``
    is the response's ``Retry-After`` header, if any."""
    parsed: Any = body
    if isinstance(body, bytes | bytearray):
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = {"message": body[:200].decode(errors="replace")}
    status_body = parsed if isinstance(parsed, dict) else {}
    code = int(status_body.get("code") or status)
    reason = str(status_body.get("reason") or "")
    message = str(status_body.get("message") or "")
    if code == 500 and "too old resource version" in message:
        code = 410  # etcd compaction reported by old servers as an internal error
    error_type = _BY_STATUS.get(code) or (ApiServerError if code >= 500 else ApiError)
    return error_type(code, reason, message, retry_after=_retry_after(retry_after, status_body))


def _refusal(response: aiohttp.ClientResponse, payload: bytes | bytearray) -> ApiError:
    """The error for a response that is not a success: its status, Status body and
    ``Retry-After``."""
    return classify(response.status, payload, retry_after=response.headers.get("Retry-After"))


@dataclass(frozen=True, slots=True)
class ApiStatistics:
    """Requests sent, by (method, status code); read by metrics at scrape time."""

    requests: Mapping[tuple[str, str], int]


WATCH_READ_BUFFER = 2**21
"""aiohttp's read buffer, as kubernetes_asyncio sets it: a watch event carrying a large object
(etcd takes requests up to 1.5 MiB) must fit."""


TLS_READ_BUFFER = 32 * 1024
"""Bytes asyncio reads from a TLS connection at a time. Its SSL transport allocates and zero-fills a
buffer of ``SSLProtocol.max_size`` (256 KiB) for every connection, and over HTTP/1.1 every watch
holds a connection of its own (client-go multiplexes them over one HTTP/2 connection): 7 kinds
watched in 20 namespaces held 35 MiB of such buffers, more than the rest of the controller. A TLS
record carries at most 16 KiB, so a read of 32 KiB still takes two records."""


def _shrink_tls_read_buffer() -> None:
    """Set asyncio's TLS read size to ``TLS_READ_BUFFER`` for the connections opened from now on.
    It is a class attribute, so this is process-wide: every TLS connection of this process is an
    API request or a webhook notification, and none needs larger reads."""
    if getattr(sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _resolve_proxy_once(configuration: Configuration) -> None:
    """The proxy for the API server from ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``, as client-go
    reads them (``http.ProxyFromEnvironment``), looked up once instead of on every request.

    kubernetes_asyncio opens its session with ``trust_env=True``, and aiohttp then resolves the
    proxy and reads ``~/.netrc`` in a thread, twice per request: two executor round trips and a
    file read for every patch (the CPU profile of 200 concurrent restarts showed them above the
    controller's own work). A proxy set in the kubeconfig or configuration wins, as before."""
    if configuration.proxy:
        return
    with contextlib.suppress(LookupError, ValueError):
        proxy, auth = get_env_proxy_for_url(URL(str(configuration.host)))
        configuration.proxy = str(proxy)
        if auth is not None:
            configuration.proxy_headers = {"Proxy-Authorization": auth.encode()}


def _client_without_environment_lookups(configuration: Configuration) -> ApiClient:
    """An ApiClient whose session does not consult the environment per request
    (``_resolve_proxy_once`` did it); same connector, limits and read buffer."""
    client = ApiClient(configuration=configuration)
    rest = client.rest_client
    opened: aiohttp.ClientSession = rest.pool_manager
    connector = opened.connector
    opened.detach()  # the connector is handed over, not closed
    rest.pool_manager = aiohttp.ClientSession(
        connector=connector, trust_env=False, read_bufsize=WATCH_READ_BUFFER
    )
    return client


async def _authorization(configuration: Configuration) -> dict[str, str]:
    """The ``authorization`` header for the next request, asked of the configuration each time:
    its refresh hook renews an expiring token (exec plugins, OIDC, a projected ServiceAccount
    token) before it answers. Client certificates are in the connector's TLS context instead."""
    bearer = (await configuration.auth_settings()).get("BearerToken")
    return {"authorization": str(bearer["value"])} if bearer and bearer.get("value") else {}


async def _session_request(
    api_client: ApiClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    data: bytes | None,
    client_timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """One request on the client's session, with its proxy and TLS server name.

    kubernetes_asyncio's ``call_api`` is skipped: it walks every body through
    ``sanitize_for_serialization``, serialises it again with the standard library's json, and
    lets its default ``User-Agent`` replace ours. The request is the same otherwise."""
    rest = api_client.rest_client
    options: dict[str, Any] = {}
    if rest.proxy:
        options["proxy"] = rest.proxy
    if rest.proxy_headers:
        options["proxy_headers"] = rest.proxy_headers
    if rest.server_hostname:
        options["server_hostname"] = rest.server_hostname
    session: aiohttp.ClientSession = rest.pool_manager
    return await session.request(
        method, url, headers=headers, data=data, timeout=client_timeout, **options
    )


class Api:
    """A thin, shared client: raw JSON in and out, errors classified.

    Two connection pools: watches hold a connection each for minutes (one per kind per watched
    namespace: 7 kinds in 20 namespaces is 140), and must never take the connections that patches
    and Events need. Watches get a pool without a limit; everything else a bounded one.
    """

    def __init__(self, configuration: Configuration) -> None:
        _shrink_tls_read_buffer()
        _resolve_proxy_once(configuration)
        self._client = _client_without_environment_lookups(configuration)
        streaming = copy.deepcopy(configuration)
        streaming.connection_pool_maxsize = 0  # aiohttp: no limit
        self._watch_client = _client_without_environment_lookups(streaming)
        self._requests: Counter[tuple[str, str]] = Counter()
        self._list_slots = asyncio.Semaphore(LIST_PAGES_IN_FLIGHT)

    @property
    def server(self) -> str:
        return str(self._client.configuration.host)

    async def close(self) -> None:
        await self._client.close()
        await self._watch_client.close()

    def statistics(self) -> ApiStatistics:
        return ApiStatistics(requests=dict(self._requests))

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        body: object = None,
        content_type: str = "application/json",
        client_timeout: aiohttp.ClientTimeout | None = None,
        watch: bool = False,
    ) -> aiohttp.ClientResponse:
        api_client = self._watch_client if watch else self._client
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        headers.update(await _authorization(api_client.configuration))
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = orjson.dumps(body)
        url = str(api_client.configuration.host) + path
        if params:
            url += "?" + urlencode(params)
        try:
            response = await _session_request(
                api_client,
                method,
                url,
                headers=headers,
                data=data,
                client_timeout=client_timeout or aiohttp.ClientTimeout(total=60),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            self._requests[(method, "<error>")] += 1
            raise ApiUnavailable(0, type(error).__name__, str(error) or repr(error)) from error
        self._requests[(method, str(response.status))] += 1
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        payload = await self._body(method, path, **kwargs)
        return _decode_object(payload) if payload else {}

    async def _body(
        self, method: str, path: str, *, max_bytes: int | None = None, **kwargs: Any
    ) -> bytes | bytearray:
        """The body of a successful answer; with ``max_bytes``, ``PageTooLarge`` past that
        size."""
        response = await self._send(method, path, **kwargs)
        async with response:
            try:
                payload = await _read(response, max_bytes)
            except (TimeoutError, aiohttp.ClientError) as error:
                raise ApiUnavailable(0, type(error).__name__, str(error)) from error
        if not 200 <= response.status < 300:
            raise _refusal(response, payload)
        return payload

    async def get(self, path: str) -> RawObject:
        return cast(RawObject, await self._json("GET", path))

    async def list_page(self, path: str, *, params: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """One page of a LIST, decoded whole: ``items`` plus ``metadata.resourceVersion`` and
        ``continue``. For the few callers that list a handful of objects; informers read theirs
        one at a time (``list_objects``)."""
        async with self._list_slots:
            return await self._json("GET", path, params=params)

    async def list_objects(
        self, path: str, *, params: Sequence[tuple[str, str]], max_bytes: int | None = None
    ) -> ListPage:
        """One page of a LIST, its objects to be read one at a time (``pages.ListPage``); with
        ``max_bytes``, a body larger than that is dropped as it arrives (``PageTooLarge``) rather
        than read whole.

        At start-up every informer lists at once; at most ``LIST_PAGES_IN_FLIGHT`` bodies are
        read at a time, so the peak (and what the allocator keeps after it) does not grow with the
        number of kinds and namespaces listed together. The caller reads the objects as soon as
        this returns, before it awaits anything else."""
        async with self._list_slots:
            return ListPage(await self._body("GET", path, params=params, max_bytes=max_bytes))

    async def create(self, path: str, body: Mapping[str, Any]) -> RawObject:
        params = [("fieldManager", FIELD_MANAGER)]
        return cast(RawObject, await self._json("POST", path, params=params, body=dict(body)))

    async def replace(self, path: str, body: Mapping[str, Any]) -> RawObject:
        """PUT the whole object; with ``metadata.resourceVersion`` in ``body`` only that version
        is replaced (409 otherwise). Some roles grant ``update`` but not ``patch``."""
        params = [("fieldManager", FIELD_MANAGER)]
        return cast(RawObject, await self._json("PUT", path, params=params, body=dict(body)))

    async def delete(
        self,
        path: str,
        *,
        propagation: str = "Background",
        preconditions: Mapping[str, str] | None = None,
    ) -> None:
        """DELETE; with ``preconditions`` (uid, resourceVersion) only that very version goes."""
        options: dict[str, Any] = {"propagationPolicy": propagation}
        if preconditions:
            options["preconditions"] = dict(preconditions)
        await self._json("DELETE", path, body=options)

    async def patch(self, path: str, patch: Any, *, patch_type: PatchType) -> RawObject:
        params = [("fieldManager", FIELD_MANAGER)]
        content_type = _PATCH_CONTENT_TYPES[patch_type]
        raw = await self._json("PATCH", path, params=params, body=patch, content_type=content_type)
        return cast(RawObject, raw)

    async def watch(
        self, path: str, *, params: Sequence[tuple[str, str]], read_timeout: float
    ) -> AsyncIterator[RawWatchEvent]:
        """Stream watch events, one JSON object per line, until the server ends the watch.

        ``read_timeout`` bounds the silence between two lines: a connection that stops delivering
        (a half-open TCP stream after an apiserver restart, a stuck proxy) raises ApiUnavailable
        instead of hanging forever. That is the stall watchdog.
        """
        # A hung server can also hang the TLS handshake of a new connection: bound it the same way.
        connect = min(30.0, read_timeout)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read_timeout)
        response = await self._send(
            "GET", path, params=[*params, ("watch", "true")], client_timeout=timeout, watch=True
        )
        async with response:
            if response.status != 200:
                raise _refusal(response, await response.read())
            # Split lines ourselves: aiohttp's readline() refuses lines over 64 KiB, and one event
            # carrying a large ConfigMap is a single line far longer than that.
            pending = bytearray()
            while True:
                try:
                    chunk = await response.content.readany()
                except (TimeoutError, aiohttp.ClientError) as error:
                    raise ApiUnavailable(0, "WatchStalled", repr(error)) from error
                if not chunk:
                    if pending.strip():
                        yield cast(RawWatchEvent, _decode_object(pending))
                    return
                pending += chunk
                del chunk  # a Secret's raw data is not kept alive while waiting for more
                start = 0
                while (end := pending.find(b"\n", start)) >= 0:
                    if end > start:
                        yield cast(RawWatchEvent, _decode_object(pending[start:end]))
                    start = end + 1
                del pending[:start]


async def _read(response: aiohttp.ClientResponse, max_bytes: int | None) -> bytes | bytearray:
    """The whole body; with ``max_bytes``, read as it arrives and dropped once larger (the
    connection is closed, not returned to the pool with a body half read)."""
    if max_bytes is None:
        return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > max_bytes:
            size = len(body)
            del body
            response.close()
            raise PageTooLarge(size, max_bytes)
    return body


def _decode_object(payload: bytes | bytearray) -> dict[str, Any]:
    """A JSON object from the server; anything else (a truncated body, a proxy's HTML page) is
    ``ApiUnavailable``, so callers retry it like a dropped connection instead of crashing a loop."""
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise ApiUnavailable(0, "BadBody", f"response is not JSON: {error}") from error
    if not isinstance(decoded, dict):
        raise ApiUnavailable(0, "BadBody", f"expected a JSON object, got {type(decoded).__name__}")
    return decoded


async def connect(*, kubeconfig: str | None) -> Api:
    """Configure from an explicit kubeconfig, else in-cluster, else $KUBECONFIG / ~/.kube/config."""
    configuration = Configuration()
    if kubeconfig:
        await load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        try:
            await load_kube_config(client_configuration=configuration)
        except ConfigException as error:
            raise ApiUnavailable(0, "NoConfiguration", str(error)) from error
    return Api(configuration)


async def connect_with_dict(kubeconfig: Mapping[str, Any]) -> Api:
    """Configure from an in-memory kubeconfig (tests and the benchmark use this)."""
    configuration = Configuration()
    await load_kube_config_from_dict(
        dict(kubeconfig), client_configuration=configuration, temp_file_path=None
    )
    return Api(configuration)
