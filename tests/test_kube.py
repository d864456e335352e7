"""The API client turns bodies that are not JSON objects into a retryable error, not a crash, goes
through the proxy the environment names (resolved once, not per request), and sends its requests
as the API server's audit log shows them."""

from __future__ import annotations

import asyncio
import gc
from asyncio import sslproto
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes_asyncio.client.configuration import Configuration

from reloader.kube import (
    MAX_RETRY_AFTER,
    TLS_READ_BUFFER,
    USER_AGENT,
    Api,
    ApiUnavailable,
    _decode_object,
    classify,
    connect_with_dict,
    wait_before_retry,
)
from reloader.model import CONFIGMAPS, RawWatchEvent
from tests.conftest import TestCluster
from tests.controlplane.envtest import free_port


@pytest.mark.parametrize(
    "payload",
    [b"<html>502 Bad Gateway</html>", b'{"type": "ADDED", "obj', b"[1, 2]", b'"text"'],
)
def test_a_body_that_is_not_a_json_object_is_retryable(payload: bytes) -> None:
    with pytest.raises(ApiUnavailable) as caught:
        _decode_object(payload)
    assert caught.value.retryable
    assert caught.value.reason == "BadBody"


def test_a_json_object_decodes() -> None:
    assert _decode_object(b'{"kind": "Status", "code": 410}') == {"kind": "Status", "code": 410}


# --- the proxy from the environment, resolved once -----------------------------------------------


class _ProxyListener:
    """A TCP server that records the first line each client sends (a proxy sees ``CONNECT``)
    and hangs up."""

    def __init__(self) -> None:
        self.first_lines: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.first_lines.append(await reader.readline())
        writer.close()


def _configuration(server: str) -> Configuration:
    configuration = Configuration()
    configuration.host = server
    return configuration


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_the_https_proxy_of_the_environment_carries_the_requests(
    no_proxy_environment: pytest.MonkeyPatch,
) -> None:
    listener = _ProxyListener()
    async with listener as proxy:
        no_proxy_environment.setenv("HTTPS_PROXY", proxy)
        api = Api(_configuration("https://api.cluster.invalid:6443"))
        try:
            with pytest.raises(ApiUnavailable):
                await api.get("/api/v1/namespaces/default")
        finally:
            await api.close()
    assert listener.first_lines, "the proxy was not used"
    assert set(listener.first_lines) == {b"CONNECT api.cluster.invalid:6443 HTTP/1.1\r\n"}


async def test_no_proxy_and_later_changes_to_the_environment_are_honoured_as_at_start(
    no_proxy_environment: pytest.MonkeyPatch,
) -> None:
    """``NO_PROXY`` keeps the API server off the proxy, and the environment is read when the
    client is made, not on every request (a proxy set afterwards is not used)."""
    listener = _ProxyListener()
    async with listener as proxy:
        no_proxy_environment.setenv("HTTPS_PROXY", proxy)
        no_proxy_environment.setenv("NO_PROXY", "127.0.0.1")
        bypassed = Api(_configuration(f"https://127.0.0.1:{free_port()}"))
        no_proxy_environment.delenv("NO_PROXY")
        no_proxy_environment.delenv("HTTPS_PROXY")
        direct = Api(_configuration(f"https://127.0.0.1:{free_port()}"))
        no_proxy_environment.setenv("HTTPS_PROXY", proxy)
        try:
            for api in (bypassed, direct):
                with pytest.raises(ApiUnavailable):
                    await api.get("/api/v1/namespaces/default")
        finally:
            await bypassed.close()
            await direct.close()
    assert listener.first_lines == []


# --- Retry-After -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        pytest.param("3", {"code": 429}, 3.0, id="header"),
        pytest.param(None, {"code": 429, "details": {"retryAfterSeconds": 2}}, 2.0, id="details"),
        pytest.param(
            "5", {"code": 429, "details": {"retryAfterSeconds": 2}}, 5.0, id="header-first"
        ),
        pytest.param("86400", {"code": 503}, MAX_RETRY_AFTER, id="capped"),
        pytest.param("Wed, 21 Oct 2026 07:28:00 GMT", {"code": 429}, None, id="date-form-ignored"),
        pytest.param("-1", {"code": 429}, None, id="negative"),
        pytest.param("nan", {"code": 429}, None, id="nan"),
        pytest.param(None, {"code": 429, "details": "x"}, None, id="bad-details"),
        pytest.param(None, {"code": 500}, None, id="none"),
    ],
)
def test_retry_after_is_read_from_the_header_or_the_status(
    header: str | None, body: dict[str, object], expected: float | None
) -> None:
    error = classify(int(str(body["code"])), body, retry_after=header)
    assert error.retry_after == expected
    assert wait_before_retry(error, 0.5) == max(0.5, expected or 0.0)


# --- TLS connections: small read buffers, whole objects ------------------------------------------


def _tls_read_buffers() -> list[int]:
    """The read buffer of every TLS connection alive in this process (asyncio keeps it in
    ``SSLProtocol._ssl_buffer``: private, read here only to see what a connection holds)."""
    return [
        len(found._ssl_buffer)
        for found in gc.get_objects()
        if isinstance(found, sslproto.SSLProtocol) and hasattr(found, "_ssl_buffer")
    ]


@pytest.mark.cluster
async def test_a_tls_connection_holds_a_small_read_buffer_and_large_objects_arrive_whole(
    admin_api: Api, namespace: str
) -> None:
    """Every watch holds a TLS connection of its own, each with asyncio's read buffer: 256 KiB by
    default, ``TLS_READ_BUFFER`` here. An object eight times that size still arrives whole, by
    list and by watch."""
    path = CONFIGMAPS.collection_path(namespace)
    first, second = "a" * 8 * TLS_READ_BUFFER, "b" * 8 * TLS_READ_BUFFER
    await admin_api.create(path, {"metadata": {"name": "big"}, "data": {"v": first}})
    page = await admin_api.list_objects(path, params=[("limit", "10")])
    assert [obj["data"]["v"] == first for obj in page.objects()] == [True]
    version = str(page.metadata["resourceVersion"])

    async def next_event() -> RawWatchEvent:
        async for event in admin_api.watch(
            path, params=[("resourceVersion", version)], read_timeout=30
        ):
            return event
        raise AssertionError("the watch ended without an event")

    changed = asyncio.create_task(next_event())
    await asyncio.sleep(0.5)  # the watch's connection is open
    await admin_api.patch(
        CONFIGMAPS.object_path(namespace, "big"), {"data": {"v": second}}, patch_type="merge"
    )
    buffers = _tls_read_buffers()  # the watch's connection among them
    event = await asyncio.wait_for(changed, timeout=30)

    assert event["type"] == "MODIFIED"
    assert event["object"]["data"]["v"] == second
    assert buffers, "no TLS connection seen"
    assert max(buffers) <= TLS_READ_BUFFER, buffers


async def test_requests_name_the_controller_and_carry_their_bodies_and_parameters(
    cluster: TestCluster, namespace: str
) -> None:
    """Each request as the API server saw it (its audit log): the controller's own User-Agent,
    not the generated client's default, which replaced it before; the query parameters; bodies
    of every patch type, and a label selector that needs escaping."""
    if cluster.plane is None:
        pytest.skip("reads the audit log of the local control plane")
    user = f"kube-test-{namespace}"
    api = await connect_with_dict(cluster.plane.audited_kubeconfig(user))
    try:
        path = CONFIGMAPS.collection_path(namespace)
        created = await api.create(path, {"metadata": {"name": "cfg"}, "data": {"k": "é ü"}})
        assert created["data"] == {"k": "é ü"}
        item = CONFIGMAPS.object_path(namespace, "cfg")
        await api.patch(item, {"data": {"a": "1"}}, patch_type="merge")
        await api.patch(item, {"metadata": {"labels": {"x": "a"}}}, patch_type="strategic")
        await api.patch(item, [{"op": "add", "path": "/data/b", "value": "2"}], patch_type="json")
        found = await api.list_page(path, params=[("labelSelector", "x in (a,b)")])
    finally:
        await api.close()

    assert [o["data"] for o in found["items"]] == [{"k": "é ü", "a": "1", "b": "2"}]
    events = [e for e in cluster.plane.audit_events(user) if e["stage"] == "ResponseComplete"]
    assert [e["verb"] for e in events] == ["create", "patch", "patch", "patch", "list"]
    assert {e["userAgent"] for e in events} == {USER_AGENT}
    queries = [parse_qs(urlsplit(e["requestURI"]).query) for e in events]
    assert queries[-1] == {"labelSelector": ["x in (a,b)"]}
    assert all(q == {"fieldManager": ["reloader"]} for q in queries[:4])
