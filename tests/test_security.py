"""What the controller exposes: its HTTP port under hostile clients, and Secret values nowhere.

The HTTP tests run the real server (``reloader.http``) on 127.0.0.1 and talk to it with raw
sockets, so the bytes on the wire are exactly what a hostile client would send. The Secret test
runs ``python -m reloader`` at debug level against the real API server, writes Secrets holding
random marker values, drives reloads, and then looks for the markers in the logs, ``/metrics``,
the probes, the Events and the memory of the live process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from reloader.http import HEAD_LIMITS, MAX_BODY_BYTES, bound_port, build_app, serve

HEAD_TIMEOUT = 1.0
"""The deadline the HTTP tests give the server (the product's default is 10 s)."""


@pytest.fixture
async def port() -> AsyncIterator[int]:
    registry = CollectorRegistry()
    Counter("reloader_test_total", "A metric so /metrics has a body.", registry=registry).inc()
    app = build_app(registry=registry, healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"))
    runner = await serve(app, host="127.0.0.1", port=0, head_timeout=HEAD_TIMEOUT)
    yield bound_port(runner)
    await runner.cleanup()


async def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a new connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


async def test_ordinary_requests_are_answered(port: int) -> None:
    for path in ("/metrics", "/healthz", "/readyz", "/live"):
        answer = await _exchange(port, _get(path))
        assert _status(answer) == 200, answer[:200]


async def test_a_request_head_sent_byte_by_byte_is_cut_off(port: int) -> None:
    """Slow loris: the head trickles in, a byte every 0.1 s, never finishing in time.

    aiohttp alone has no deadline for a request head: this connection stayed open for as long as
    the client kept sending (the test would time out). Meanwhile other clients are served.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = _get("/metrics", "X-Padding: " + "p" * 200)
    started = time.monotonic()
    closed_after: float | None = None
    try:
        for byte in head[:-4]:
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof() or writer.is_closing():
                break
            try:
                if await asyncio.wait_for(reader.read(1), timeout=0.1) == b"":
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > 1.0 and time.monotonic() - started < 1.3:
                assert _status(await _exchange(port, _get("/healthz"))) == 200
        closed_after = time.monotonic() - started
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None
    assert closed_after < HEAD_TIMEOUT + 2.0, f"connection held for {closed_after:.1f}s"
    assert closed_after >= HEAD_TIMEOUT - 0.1


async def test_a_silent_connection_is_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        assert await asyncio.wait_for(reader.read(), timeout=HEAD_TIMEOUT + 5) == b""
    finally:
        writer.close()
    assert time.monotonic() - started < HEAD_TIMEOUT + 2.0


async def test_a_head_split_across_packets_within_the_deadline_is_served(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = _get("/healthz")
    try:
        for piece in (head[:10], head[10:-3], head[-3:-1], head[-1:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(HEAD_TIMEOUT / 5)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    assert _status(answer) == 200


async def test_keep_alive_requests_each_get_their_own_deadline(port: int) -> None:
    """A keep-alive client (Prometheus) idles between scrapes; each head is timed on its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        for _ in range(2):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            assert _status(head) == 200
            await asyncio.wait_for(reader.readexactly(3), timeout=5)  # "ok\n"
            await asyncio.sleep(HEAD_TIMEOUT * 1.5)  # idle, with no head in progress
    finally:
        writer.close()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(["X-Big: " + "b" * (HEAD_LIMITS["max_field_size"] + 1)], id="long-field"),
        pytest.param([f"X-H{i}: v" for i in range(HEAD_LIMITS["max_headers"] + 1)], id="many"),
    ],
)
async def test_oversized_request_heads_are_refused(port: int, headers: list[str]) -> None:
    """aiohttp's defaults are 8190-byte fields and 128 headers; both are lowered here."""
    answer = await _exchange(port, _get("/metrics", *headers))
    assert _status(answer) in (400, 431), answer[:200]


async def test_a_long_request_line_is_refused(port: int) -> None:
    answer = await _exchange(port, _get("/metrics?" + "q" * HEAD_LIMITS["max_line_size"]))
    assert _status(answer) in (400, 414), answer[:200]


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        pytest.param(f"Content-Length: {MAX_BODY_BYTES + 1}", b"x" * 100, id="content-length"),
        pytest.param("Transfer-Encoding: chunked", b"1000\r\n" + b"x" * 100, id="chunked"),
    ],
)
async def test_a_request_body_is_refused_without_reading_it(
    port: int, framing: str, body: bytes
) -> None:
    """413 at once, and the connection closed: the body is never read (no endpoint takes one).

    Without the check, aiohttp answers 200 and then reads and discards the body for up to ten
    seconds of lingering before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["GET /metrics HTTP/1.1", "Host: x", framing, "", ""]
    started = time.monotonic()
    try:
        writer.write("\r\n".join(lines).encode() + body)  # the body, never finished
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    assert _status(answer) == 413, answer[:200]
    assert time.monotonic() - started < 2.0


async def test_no_debug_or_profiling_endpoints(port: int) -> None:
    for path in ("/debug/pprof/", "/debug/pprof/cmdline", "/debug/vars", "/metrics/../../etc"):
        assert _status(await _exchange(port, _get(path))) == 404, path
