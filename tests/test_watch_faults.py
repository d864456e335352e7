"""The informer under faults that used to empty its store, end the process or spin.

- Read access revoked while it runs (a RoleBinding deleted): the store is kept, nobody is told of
  a delete, and it resumes when access is granted again.
- The relist after 410 fails: the informer backs off and relists again (it used to end), paged.
- A watch that ends at once: reopened after a backoff, not in a hot loop.

The first two run against the real API server as a ServiceAccount (TokenRequest) whose Role the
test edits; the relist one also restarts the apiserver (local control plane only). The last puts
a loopback HTTP proxy in front of the real API server: lists go through to it, watches are
answered with an empty 200 stream, a fault the real server cannot be made to produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from aiohttp import web
from kubernetes_asyncio import client

import reloader.watch
from reloader.kube import Api, ApiForbidden
from reloader.model import CONFIGMAPS
from reloader.watch import Informer
from tests.conftest import TestCluster
from tests.scenario import wait_for
from tests.test_manifests import service_account_api
from tests.test_watch import Recorder, create, local_plane, name_and_data, run_until_synced, stop

pytestmark = pytest.mark.cluster
RBAC = "/apis/rbac.authorization.k8s.io/v1"
READER = "cm-reader"


def role_rules(verbs: Sequence[str]) -> list[dict[str, Any]]:
    return [{"apiGroups": [""], "resources": ["configmaps"], "verbs": list(verbs)}]


def binding_body() -> dict[str, Any]:
    return {
        "metadata": {"name": READER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": READER},
        "subjects": [{"kind": "ServiceAccount", "name": READER}],
    }


async def reader_api(admin_api: Api, cluster: TestCluster, namespace: str) -> Api:
    """An Api as a ServiceAccount that may list and watch ConfigMaps in ``namespace`` only."""
    await admin_api.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": READER}}
    )
    role = {"metadata": {"name": READER}, "rules": role_rules(["list", "watch"])}
    await admin_api.create(f"{RBAC}/namespaces/{namespace}/roles", role)
    await admin_api.create(f"{RBAC}/namespaces/{namespace}/rolebindings", binding_body())
    api = await service_account_api(admin_api, cluster.kubeconfig, namespace=namespace, name=READER)
    await wait_list_allowed(api, namespace, allowed=True)
    return api


async def wait_list_allowed(api: Api, namespace: str, *, allowed: bool) -> None:
    """Wait until the server answers a LIST as ``api`` with 200 (or, not allowed, with 403)."""

    async def answered() -> bool:
        try:
            await api.list_page(CONFIGMAPS.collection_path(namespace), params=[("limit", "1")])
        except ApiForbidden:
            return not allowed
        return allowed

    await wait_for(answered, timeout=15, message=f"list allowed={allowed} in effect")


def forbidden_answers(api: Api) -> int:
    """403 answers the server gave this client (counted in ``kube.Api`` per response status)."""
    return api.statistics().requests.get(("GET", "403"), 0)


def reader_informer(api: Api, namespace: str, **options: Any) -> Informer[Any]:
    return Informer(
        api=api,
        resource=CONFIGMAPS,
        transform=name_and_data,
        namespaces=[namespace],
        label_selector="suite=watch",
        **options,
    )


async def test_revoked_read_access_keeps_the_store_then_resumes(
    cluster: TestCluster, admin_api: Api, namespace: str
) -> None:
    """1. A ServiceAccount may list and watch ConfigMaps; its informer holds a and b. Watches
    last 3 s (the server ends each with a bookmark), so the next one is opened soon.
    2. The RoleBinding is deleted: the next watch is answered 403.
    Result: a and b stay in the store and no subscriber is told of a delete (before, the store
    was emptied: a delete per object, a restart storm with ``--reload-on-delete``).
    3. a changes while access is revoked; the RoleBinding is created again.
    Result: the informer resumes and sees the change; still no delete.
    """
    api = await reader_api(admin_api, cluster, namespace)
    await create(admin_api, namespace, "a", {"v": "1"})
    await create(admin_api, namespace, "b", {"v": "1"})
    watched = reader_informer(api, namespace, watch_timeout_range=(3, 4))
    recorder = Recorder()
    watched.subscribe(recorder)
    task = await run_until_synced(watched)
    try:
        assert {name for name, _ in watched.values()} == {"a", "b"}
        await admin_api.delete(f"{RBAC}/namespaces/{namespace}/rolebindings/{READER}")

        async def refused() -> bool:
            return forbidden_answers(api) >= 1

        await wait_for(refused, timeout=30, message="the informer's next watch is refused")
        await asyncio.sleep(1)  # what the informer does with the 403 has happened by now
        assert recorder.deleted() == set()
        assert {name for name, _ in watched.values()} == {"a", "b"}
        assert not task.done()

        path = CONFIGMAPS.object_path(namespace, "a")
        await admin_api.patch(path, {"data": {"v": "2"}}, patch_type="merge")
        await admin_api.create(f"{RBAC}/namespaces/{namespace}/rolebindings", binding_body())

        async def resumed() -> bool:
            a = watched.get(namespace, "a")
            return a is not None and "'2'" in a[1]

        await wait_for(resumed, timeout=60, message="the change made while revoked is seen")
        assert recorder.deleted() == set()
        assert watched.get(namespace, "b") is not None
    finally:
        await stop(task)
        await api.close()


async def test_a_relist_after_410_that_fails_is_retried_and_paged(
    cluster: TestCluster, admin_api: Api, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. The informer (pages of one object) holds a, b and c, as a ServiceAccount.
    2. Its Role loses ``list`` (the open watch is not affected). The apiserver stops, c is deleted
    straight from etcd, the apiserver starts: the resumed watch gets 410 and the relist gets 403.
    Result: the informer keeps running (before, the error escaped the relist and ended the loop),
    and removes nothing on an error (a restarted apiserver may also refuse the first watch until
    its RBAC cache has synced; before, that 403 emptied the store).
    3. ``list`` is granted again.
    Result: the relist succeeds, page by page, and synthesises the delete of c.
    """
    plane = local_plane(cluster)
    monkeypatch.setattr(reloader.watch, "PAGE_SIZE", 1)
    api = await reader_api(admin_api, cluster, namespace)
    for name in "abc":
        await create(admin_api, namespace, name, {"v": "1"})
    lists: list[dict[str, str]] = []
    list_objects = api.list_objects

    async def recording_list_page(
        path: str, *, params: Sequence[tuple[str, str]], max_bytes: int | None = None
    ) -> Any:
        lists.append(dict(params))
        return await list_objects(path, params=params, max_bytes=max_bytes)

    monkeypatch.setattr(api, "list_objects", recording_list_page)
    watched = reader_informer(api, namespace)
    recorder = Recorder()
    watched.subscribe(recorder)
    task = await run_until_synced(watched)
    role = f"{RBAC}/namespaces/{namespace}/roles/{READER}"
    try:
        await admin_api.patch(role, {"rules": role_rules(["watch"])}, patch_type="merge")
        await wait_list_allowed(api, namespace, allowed=False)
        refused_before = forbidden_answers(api)
        await asyncio.to_thread(plane.stop_apiserver)
        assert await asyncio.to_thread(plane.etcd_delete, f"/registry/configmaps/{namespace}/c")
        await asyncio.to_thread(plane.start_apiserver)

        async def relist_refused() -> bool:
            refused = watched.statistics().relists >= 1 and forbidden_answers(api) > refused_before
            return refused or task.done() or bool(recorder.deleted())  # the last two: fail below

        await wait_for(relist_refused, timeout=60, message="the relist after 410 is refused")
        await asyncio.sleep(1)
        assert not task.done(), task
        assert recorder.deleted() == set()
        assert watched.get(namespace, "c") is not None

        first_relist_request = len(lists)
        await admin_api.patch(role, {"rules": role_rules(["list", "watch"])}, patch_type="merge")

        async def c_gone() -> bool:
            return watched.get(namespace, "c") is None

        await wait_for(c_gone, timeout=90, message="the relist succeeds once list is allowed")
        assert recorder.deleted() == {"c"}
        assert {name for name, _ in watched.values()} == {"a", "b"}
        relist = lists[first_relist_request:]
        assert all(params.get("limit") == "1" for params in relist), relist
        assert sum("continue" in params for params in relist) >= 1, relist
    finally:
        await stop(task)
        await api.close()


class WatchEndingProxy:
    """Loopback HTTP in front of the real API server: a LIST is forwarded and answered with the
    server's body; a WATCH is answered 200 with an empty stream (the fault), unless ``forward``
    is set, when the server's events are passed on until it is cleared again."""

    def __init__(self, upstream: Api) -> None:
        self.upstream = upstream
        self.watches: list[float] = []
        self.forward = False
        self._stop_forwarding = asyncio.Event()

    def stop_forwarding(self) -> None:
        self.forward = False
        self._stop_forwarding.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        params = [(k, v) for k, v in request.query.items() if k != "watch"]
        if request.query.get("watch") != "true":
            body = await self.upstream.list_page(request.path, params=params)
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        self.watches.append(time.monotonic())
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        if self.forward:
            self._stop_forwarding.clear()
            await self._pass_on(request.path, params, response)
        await response.write_eof()
        return response

    async def _pass_on(
        self, path: str, params: list[tuple[str, str]], response: web.StreamResponse
    ) -> None:
        async def pump() -> None:
            async for event in self.upstream.watch(path, params=params, read_timeout=70):
                await response.write(orjson.dumps(event) + b"\n")

        pumping = asyncio.create_task(pump())
        stopping = asyncio.create_task(self._stop_forwarding.wait())
        await asyncio.wait({pumping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (pumping, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def proxy_api(proxy: WatchEndingProxy) -> AsyncIterator[Api]:
    """Serve ``proxy`` on a free loopback port; yield an Api (no credentials) pointed at it."""
    app = web.Application()
    app.router.add_get("/{path:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    api = Api(client.Configuration(host=f"http://{host}:{port}"))
    try:
        yield api
    finally:
        await api.close()
        await runner.cleanup()


async def test_a_watch_that_ends_at_once_is_reopened_after_a_backoff(
    admin_api: Api, namespace: str
) -> None:
    """1. Every watch ends at once with 200 and no event, for 8 s.
    Result: a handful of watch requests with growing pauses (before: a request per round trip,
    thousands), and the informer is still synced.
    2. Watches go through to the server; a ConfigMap is created and seen (a healthy watch).
    3. Watches end at once again.
    Result: the first reopen is quick again: the healthy watch reset the backoff.
    """
    proxy = WatchEndingProxy(admin_api)
    async with proxy_api(proxy) as api:
        watched = reader_informer(api, namespace)
        task = await run_until_synced(watched)
        try:
            await asyncio.sleep(8)
            assert 2 <= len(proxy.watches) <= 8, len(proxy.watches)
            gaps = [b - a for a, b in zip(proxy.watches, proxy.watches[1:], strict=False)]
            assert gaps[-1] > gaps[0], gaps

            proxy.forward = True
            await create(admin_api, namespace, "late", {"v": "1"})

            async def seen() -> bool:
                return watched.get(namespace, "late") is not None

            await wait_for(seen, timeout=40, message="a forwarded watch delivers the event")
            await asyncio.sleep(1.5)  # the forwarded watch has been healthy for a while
            count = len(proxy.watches)
            ended = time.monotonic()
            proxy.stop_forwarding()

            async def reopened() -> bool:
                return len(proxy.watches) > count

            await wait_for(reopened, timeout=10, message="a watch is opened again")
            assert proxy.watches[count] - ended < 2.0, proxy.watches[count] - ended
            assert not task.done()
        finally:
            await stop(task)
