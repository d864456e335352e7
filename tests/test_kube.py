"""The API client turns bodies that are not JSON objects into a retryable error, not a crash, and
goes through the proxy the environment names (resolved once, not per request)."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio.client.configuration import Configuration

from reloader.kube import (
    MAX_RETRY_AFTER,
    Api,
    ApiUnavailable,
    _decode_object,
    classify,
    wait_before_retry,
)
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
