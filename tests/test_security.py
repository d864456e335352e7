"""What the controller exposes: its HTTP port under hostile clients, and Secret values nowhere.

The HTTP tests run the real server (``reloader.http``) on 127.0.0.1 and talk to it with raw
sockets, so the bytes on the wire are exactly what a hostile client would send. The Secret test
runs ``python -m reloader`` at debug level against the real API server, writes Secrets holding
random marker values, drives reloads, and then looks for the markers in the logs, ``/metrics``,
the probes, the Events and the memory of the live process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from reloader.annotations import DEFAULT_NAMES
from reloader.http import HEAD_LIMITS, MAX_BODY_BYTES, bound_port, build_app, serve
from reloader.model import EVENTS, RECORD_ANNOTATION
from tests.conftest import TestCluster
from tests.controlplane.envtest import free_port
from tests.scenario import Cluster, answers_ok, container, deployment, http_get, wait_for

HEAD_TIMEOUT = 1.0
"""The deadline the HTTP tests give the server (the product's default is 10 s)."""
AUTO = DEFAULT_NAMES.auto
PATHS = ("/metrics", "/healthz", "/readyz", "/live")


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
    for path in PATHS:
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


# --- Secret values: logs, /metrics, probes, Events, the process's memory ---------------------


LIVE_PROBE = """
import ctypes, gc, json, os, runpy, signal, sys

def _done(name, found):
    path = os.path.join(os.environ["PROBE_DIR"], name)
    with open(path + ".part", "w") as out:
        json.dump(found, out)
    os.replace(path + ".part", path)

def _trim(signum, frame):
    gc.collect()
    _done("trimmed", ctypes.CDLL(None).malloc_trim(0))

def _search(signum, frame):
    with open(os.path.join(os.environ["PROBE_DIR"], "needles")) as source:
        needles = {label: text.encode("latin-1") for label, text in json.load(source).items()}
    seen = {id(needle) for needle in needles.values()}
    found = {}
    stack = gc.get_objects()
    seen.add(id(stack))
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
        elif isinstance(obj, (bytes, bytearray)):
            data = bytes(obj)
        else:
            stack.extend(gc.get_referents(obj))
            continue
        for label, needle in needles.items():
            if needle in data:
                found[label] = found.get(label, 0) + 1
    _done("found", found)

signal.signal(signal.SIGUSR2, _trim)
signal.signal(signal.SIGUSR1, _search)
sys.argv[0] = "reloader"
runpy.run_module("reloader", run_name="__main__", alter_sys=True)
"""
"""Runs ``python -m reloader`` unchanged, started through ``runpy`` with two signal handlers:
SIGUSR2 collects garbage and returns freed heap pages to the system (glibc ``malloc_trim``);
SIGUSR1 counts the live Python objects (str, bytes, bytearray reachable from any gc-tracked
object, through untracked containers too) that hold each needle. Test instrumentation, not a
product hook. The needles are read as bytes, so no str the search makes equals one, and its own
bytes objects are skipped by id; they are read only after the raw memory scans, which they would
otherwise pollute."""


def _markers(count: int) -> list[str]:
    """Random values no process could hold by chance: 36 random bytes as 48 URL-safe characters
    (a multiple of three, so the base64 of each is a fixed string with no padding)."""
    return [f"mk{secrets.token_urlsafe(36)}"[:48] for _ in range(count)]


def _forms(value: str) -> dict[str, bytes]:
    """Every encoding of a Secret value that the process could plausibly hold."""
    raw = value.encode()
    return {
        "plain": raw,
        "base64": base64.b64encode(raw),
        "utf-16": value.encode("utf-16-le"),
        "utf-32": value.encode("utf-32-le"),
    }


@dataclass(frozen=True)
class Region:
    """One mapping of a process, from ``/proc/<pid>/maps``."""

    start: int
    end: int
    perms: str
    name: str


def _writable_regions(pid: int) -> list[Region]:
    """The readable and writable mappings: the heap, arenas, anonymous maps, stacks; not code or
    read-only files (a value found only there was not put there by the process)."""
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        name = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and not name.startswith("[vvar"):
            regions.append(Region(start, end, fields[1], name))
    return regions


def _memory_hits(pid: int, needles: Mapping[str, bytes]) -> dict[str, list[str]]:
    """Where each needle occurs in the process's writable memory, as ``region+offset``.

    Read through ``/proc/<pid>/mem`` while the process runs (as root, or as its own user with
    ptrace allowed): no debug hook in the product, and the same bytes a core dump would hold.
    """
    hits: dict[str, list[str]] = {label: [] for label in needles}
    try:
        memory = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115
    except PermissionError as error:
        pytest.skip(f"cannot read the controller's memory (needs ptrace rights): {error}")
    with memory:
        for region in _writable_regions(pid):
            try:
                memory.seek(region.start)
                data = memory.read(region.end - region.start)
            except OSError:  # a mapping that went away or cannot be read (guard pages)
                continue
            for label, needle in needles.items():
                at = data.find(needle)
                while at >= 0:
                    hits[label].append(f"{region.name or 'anon'}+{at:#x}")
                    at = data.find(needle, at + 1)
    return hits


def _credentials(kubeconfig: Mapping[str, Any]) -> list[str]:
    """The kubeconfig's secrets (token, client key, password): they must not leak either."""
    found = []
    for user in kubeconfig.get("users", []):
        for field in ("token", "client-key-data", "password"):
            if value := user.get("user", {}).get(field):
                found.append(str(value))
    return found


@contextlib.contextmanager
def _controller_process(
    kubeconfig: Path, namespace: str, port: int, probe_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m reloader`` at debug level (through ``LIVE_PROBE``); SIGTERM at the end."""
    with (probe_dir / "log").open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LIVE_PROBE,
                f"--kubeconfig={kubeconfig}",
                f"--namespaces={namespace}",
                f"--controller-namespace={namespace}",
                f"--metrics-port={port}",
                "--metrics-address=127.0.0.1",
                "--log-format=json",
                "--log-level=debug",
                "--debounce-seconds=0.2",
                "--min-restart-interval-seconds=0",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PROBE_DIR": str(probe_dir)},
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.mark.cluster
@pytest.mark.timeout(240)
async def test_secret_values_appear_in_no_log_metric_probe_event_or_memory(
    cluster: TestCluster, scene: Cluster, tmp_path: Path
) -> None:
    """1. Three Secrets hold random markers: one read through an env key, one through a volume,
       one that no workload uses; ``python -m reloader`` runs at debug level.
    2. Each used Secret is rotated to a new marker twice; each rotation must restart its user
       (proof that the values went through the controller), the unused one changes too.
    3. Searched for every marker in every encoding: the logs, ``/metrics``, the probes, all Events
       of the namespace, and the live process's writable memory.
    """
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig))
    port = free_port()
    values = {name: _markers(3) for name in ("db", "tls", "unused")}
    for name, (first, *_) in values.items():
        await scene.create_secret(name, {"value": first})
    env = {"name": "V", "valueFrom": {"secretKeyRef": {"name": "db", "key": "value"}}}
    await scene.create_workload(
        deployment("api", annotations={AUTO: "true"}, containers=[container(env=[env])])
    )
    volume = {"name": "tls", "secret": {"secretName": "tls"}}
    mount = {"name": "tls", "mountPath": "/tls"}
    await scene.create_workload(
        deployment(
            "files",
            annotations={AUTO: "true"},
            containers=[container(volumeMounts=[mount])],
            volumes=[volume],
        )
    )
    needles = {
        f"{name}[{i}] {form}": encoded
        for name, markers in values.items()
        for i, marker in enumerate(markers)
        for form, encoded in _forms(marker).items()
    }
    with _controller_process(kubeconfig, scene.namespace, port, tmp_path) as process:
        try:
            await wait_for(answers_ok(port, "/readyz"), timeout=60, message="/readyz answers 200")
            for name in ("api", "files"):
                await scene.wait_recorded(name)
            for rotation in (1, 2):
                for name, markers in values.items():
                    await scene.set_secret(name, {"value": markers[rotation]})
                for name in ("api", "files"):
                    await scene.wait_replica_sets(name, rotation + 1)
            await asyncio.sleep(1.0)  # the last Events and records written, the process idle
            exposed = {path: http_get(port, path)[1] for path in PATHS}
            raw = await asyncio.to_thread(_memory_hits, process.pid, needles)
            await _signalled(process, signal.SIGUSR2, tmp_path / "trimmed")
            trimmed = await asyncio.to_thread(_memory_hits, process.pid, needles)
            control = {"control: the namespace": scene.namespace.encode()}
            (tmp_path / "needles").write_text(
                json.dumps({k: v.decode("latin-1") for k, v in (needles | control).items()})
            )
            live = await _signalled(process, signal.SIGUSR1, tmp_path / "found")
        except AssertionError as error:
            log = (tmp_path / "log").read_text()[-3000:]
            raise AssertionError(f"{error}\nlog:\n{log}") from None
    logs = (tmp_path / "log").read_text()
    assert '"level":"debug"' in logs, "the controller did not log at debug level"
    page = await scene.api.list_page(EVENTS.collection_path(scene.namespace), params=[])
    events = json.dumps(page.get("items", []))
    assert '"Reloaded"' in events
    places = {"logs": logs, "events": events, **exposed}
    for label, needle in needles.items():
        for place, text in places.items():
            assert needle.decode("latin-1") not in text, f"{label} found in {place}"
    for credential in _credentials(cluster.kubeconfig):
        for place, text in places.items():
            assert credential not in text, f"a kubeconfig credential found in {place}"

    figures = {
        "raw": {k: len(v) for k, v in raw.items() if v},
        "after gc and malloc_trim": {k: len(v) for k, v in trimmed.items() if v},
        "live objects": live,
    }
    print("Secret markers in the controller's memory:", json.dumps(figures, indent=1))
    decoded = [k for k, v in raw.items() if v and not k.endswith(" base64")]
    assert decoded == [], f"decoded Secret values in memory (the values are never decoded): {raw}"
    assert live.pop("control: the namespace", 0) > 0, "the live search found nothing it should"
    assert live == {}, f"live objects hold Secret values: {sorted(live)}"


async def _signalled(
    process: subprocess.Popen[bytes], signum: signal.Signals, answer: Path
) -> dict[str, int]:
    """Send ``signum`` to the controller and return what ``LIVE_PROBE`` wrote to ``answer``."""
    process.send_signal(signum)

    async def written() -> bool:
        return await asyncio.to_thread(answer.exists)

    await wait_for(written, timeout=60, message=f"{answer.name} from the controller")
    found = json.loads(await asyncio.to_thread(answer.read_text))
    return found if isinstance(found, dict) else {"result": found}


# --- Digests on workloads are keyed ------------------------------------------------------------


def _plain_digests(key: str, value: str) -> set[str]:
    """Every unkeyed digest of one Secret entry a reader of the workload could compute and
    compare: SHA-1 (Stakater's ``key=value``), SHA-256 and others, over the value, its base64,
    and the framings, as hex (whole, and cut to 32 or 16 characters) and base64."""
    encoded = base64.b64encode(value.encode()).decode()
    messages = [
        value,
        encoded,
        f"{key}={value}",
        f"{key}={encoded}",
        f"{key}{value}",
        json.dumps({key: value}),
        json.dumps({key: encoded}),
    ]
    found = set()
    for algorithm in ("sha1", "sha256", "sha512", "md5", "blake2b", "sha3_256"):
        for message in messages:
            digest = hashlib.new(algorithm, message.encode()).digest()
            hexed = digest.hex()
            found |= {hexed, hexed[:32], hexed[:16]}
            found |= {base64.b64encode(digest).decode(), base64.urlsafe_b64encode(digest).decode()}
    return found


@pytest.mark.cluster
async def test_recorded_digests_are_keyed_not_plain_hashes(scene: Cluster) -> None:
    """1. Two Secrets with the same value under the same key, both read by one Deployment.
    2. The record is made; then both rotate to another shared value and the Deployment restarts.
    Result: no digest in the record or the restart marker equals any plain hash of the data, and
    the two Secrets' digests differ (a plain hash of equal data would be equal).
    """
    pin = secrets.randbelow(10**6)
    first, second = f"{pin:06d}", f"{(pin + 1) % 10**6:06d}"  # a PIN: brute-forced in a second
    for name in ("db", "db-copy"):
        await scene.create_secret(name, {"password": first})
    env = [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": source, "key": "password"}}}
        for name, source in (("A", "db"), ("B", "db-copy"))
    ]
    await scene.create_workload(
        deployment("api", annotations={AUTO: "true"}, containers=[container(env=env)])
    )
    await scene.start_controller()
    before = (await scene.wait_recorded("api"))["metadata"]["annotations"][RECORD_ANNOTATION]
    for name in ("db", "db-copy"):
        await scene.set_secret(name, {"password": second})
    marker = await scene.wait_marker("Deployment", "api")
    obj = await scene.get_workload("Deployment", "api")
    after = obj["metadata"]["annotations"][RECORD_ANNOTATION]

    for record, value in ((before, first), (after, second)):
        configs = json.loads(record)["configs"]
        assert configs["Secret/db"] != configs["Secret/db-copy"], record
        written = {*configs.values(), record}
        for plain in _plain_digests("password", value):
            assert not any(plain in text for text in written), (
                f"plain digest of {value} in {record}"
            )
    for plain in _plain_digests("password", second) | _plain_digests("password", first):
        assert plain not in marker, marker
    assert json.loads(marker)["hash"] in json.loads(after)["configs"].values()
