"""The informer against a real API server: paged list, watch, 410 relist, stall watchdog.

Faults are real ones: the apiserver is stopped and started again (every watch breaks, the watch
cache starts over so old resourceVersions are gone), an object is deleted straight from etcd while
nobody watches, and the apiserver is frozen with SIGSTOP so its connections go silent. These need
the local control plane; on other backends they are skipped.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import reloader.watch
from reloader.annotations import AnnotationNames
from reloader.digests import DigestKey
from reloader.kube import Api, connect_with_dict
from reloader.model import CONFIGMAPS, KINDS, RawMetadata, RawObject
from reloader.snapshots import (
    ConfigSnapshot,
    SnapshotContext,
    WorkloadSnapshot,
    config_snapshot,
    pack_config,
    refreshed_workload,
    unpacker,
    workload_snapshot,
)
from reloader.watch import Informer, Packing
from tests.conftest import TestCluster
from tests.scenario import deployment, wait_for

pytestmark = pytest.mark.cluster
LABEL = {"suite": "watch"}
CONTEXT = SnapshotContext(
    digest_key=DigestKey.from_secret(b"k" * 32), names=AnnotationNames(), auto_reload_all=False
)


def name_and_data(obj: RawObject) -> tuple[str, str]:
    return obj["metadata"]["name"], str(sorted((obj.get("data") or {}).items()))


class Recorder:
    """A subscriber that keeps every notification."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def __call__(self, old: Any, new: Any) -> None:
        self.seen.append((old, new))

    def deleted(self) -> set[str]:
        return {old[0] for old, new in self.seen if new is None}


async def create(api: Api, namespace: str, name: str, data: Mapping[str, str]) -> None:
    body = {"metadata": {"name": name, "labels": LABEL}, "data": dict(data)}
    await api.create(CONFIGMAPS.collection_path(namespace), body)


def configmap_informer(
    api: Api, namespace: str, *, stall_timeout: float
) -> Informer[tuple[str, str]]:
    """An informer of this suite's ConfigMaps in ``namespace``: (name, data) per object."""
    return Informer(
        api=api,
        resource=CONFIGMAPS,
        transform=name_and_data,
        namespaces=[namespace],
        label_selector="suite=watch",
        stall_timeout=stall_timeout,
    )


@pytest.fixture
async def informer(admin_api: Api, namespace: str) -> tuple[Informer[Any], Recorder]:
    watched = configmap_informer(admin_api, namespace, stall_timeout=3)
    recorder = Recorder()
    watched.subscribe(recorder)
    return watched, recorder


async def run_until_synced(informer: Informer[Any]) -> asyncio.Task[None]:
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.wait_synced(), timeout=30)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_lists_in_pages_then_follows_changes(
    admin_api: Api, namespace: str, informer: tuple[Informer[Any], Recorder], monkeypatch: Any
) -> None:
    watched, recorder = informer
    monkeypatch.setattr(reloader.watch, "PAGE_SIZE", 2)
    for i in range(5):
        await create(admin_api, namespace, f"cm-{i}", {"v": str(i)})
    task = await run_until_synced(watched)
    try:
        assert len(watched) == 5
        await create(admin_api, namespace, "late", {"v": "x"})
        await admin_api.patch(
            CONFIGMAPS.object_path(namespace, "cm-0"), {"data": {"v": "new"}}, patch_type="merge"
        )
        await admin_api.delete(CONFIGMAPS.object_path(namespace, "cm-1"))

        async def caught_up() -> bool:
            cm0 = watched.get(namespace, "cm-0")
            return (
                watched.get(namespace, "late") is not None
                and cm0 is not None
                and "new" in cm0[1]
                and watched.get(namespace, "cm-1") is None
            )

        await wait_for(caught_up, message="informer follows create, update and delete")
        assert recorder.deleted() == {"cm-1"}
    finally:
        await stop(task)


async def test_a_paged_relist_deletes_only_what_no_page_held(
    admin_api: Api, namespace: str, informer: tuple[Informer[Any], Recorder], monkeypatch: Any
) -> None:
    """A second list, in pages of two, after one object was deleted behind the informer's back:
    that one is notified deleted once the last page is in, and the objects of later pages stay."""
    watched, recorder = informer
    monkeypatch.setattr(reloader.watch, "PAGE_SIZE", 2)
    for i in range(5):
        await create(admin_api, namespace, f"cm-{i}", {"v": str(i)})
    await watched._list(namespace)
    assert len(watched) == 5
    await admin_api.delete(CONFIGMAPS.object_path(namespace, "cm-1"))
    await watched._list(namespace)
    assert recorder.deleted() == {"cm-1"}
    assert sorted(watched.in_namespace(namespace)) == ["cm-0", "cm-2", "cm-3", "cm-4"]


async def test_label_only_change_is_not_notified(
    admin_api: Api, namespace: str, informer: tuple[Informer[Any], Recorder]
) -> None:
    """Snapshots that compare equal are not passed on: no work for a change that cannot matter."""
    watched, recorder = informer
    await create(admin_api, namespace, "cm", {"v": "1"})
    task = await run_until_synced(watched)
    try:
        before = len(recorder.seen)
        path = CONFIGMAPS.object_path(namespace, "cm")
        await admin_api.patch(path, {"metadata": {"labels": {"x": "y"}}}, patch_type="merge")
        await admin_api.patch(path, {"data": {"v": "2"}}, patch_type="merge")

        async def changed() -> bool:
            return len(recorder.seen) > before

        await wait_for(changed, message="data change seen")
        assert len(recorder.seen) == before + 1
    finally:
        await stop(task)


async def test_a_packed_store_reads_and_notifies_whole_snapshots(
    admin_api: Api, namespace: str
) -> None:
    """The config informers keep digests and flags only (``Packing``): readers and subscribers
    still get snapshots, the old one included, and an update that packs the same is not passed
    on."""
    context = CONTEXT
    watched = Informer[ConfigSnapshot](
        api=admin_api,
        resource=CONFIGMAPS,
        transform=lambda obj: config_snapshot("ConfigMap", obj, context=context),
        namespaces=[namespace],
        label_selector="suite=watch",
        packing=Packing(pack_config, unpacker("ConfigMap")),
    )
    recorder = Recorder()
    watched.subscribe(recorder)
    await create(admin_api, namespace, "cm", {"v": "1"})
    task = await run_until_synced(watched)
    try:
        listed = watched.get(namespace, "cm")
        assert listed is not None and listed.key.name == "cm" and not listed.match
        assert dict(watched.in_namespace(namespace)) == {"cm": listed}
        path = CONFIGMAPS.object_path(namespace, "cm")
        await admin_api.patch(path, {"metadata": {"labels": {"x": "y"}}}, patch_type="merge")
        match = {"reloader.stakater.com/match": "true"}
        await admin_api.patch(path, {"metadata": {"annotations": match}}, patch_type="merge")
        await admin_api.patch(path, {"data": {"v": "2"}}, patch_type="merge")
        await admin_api.delete(path)

        async def deleted() -> bool:
            return bool(recorder.seen) and recorder.seen[-1][1] is None

        await wait_for(deleted, message="delete seen")

        def matched(value: str) -> ConfigSnapshot:
            metadata: RawMetadata = {"name": "cm", "namespace": namespace, "annotations": match}
            return config_snapshot(
                "ConfigMap", {"metadata": metadata, "data": {"v": value}}, context=context
            )

        assert recorder.seen == [
            (None, listed),
            (listed, matched("1")),  # the label-only change before it was not passed on
            (matched("1"), matched("2")),
            (matched("2"), None),
        ]
        assert watched.get(namespace, "cm") is None and len(watched) == 0
    finally:
        await stop(task)


def local_plane(cluster: TestCluster) -> Any:
    if cluster.plane is None:
        pytest.skip("restarts the API server: local control plane only")
    return cluster.plane


async def audited_informer(
    plane: Any, user: str, namespace: str, *, stall_timeout: float = 70.0
) -> tuple[Api, Informer[tuple[str, str]]]:
    """An informer of this suite's ConfigMaps whose requests the audit log names ``user``."""
    api = await connect_with_dict(plane.audited_kubeconfig(user))
    return api, configmap_informer(api, namespace, stall_timeout=stall_timeout)


def list_limits(plane: Any, user: str) -> list[int]:
    """The ``limit`` of each list request ``user`` sent, as the apiserver's audit log saw them."""
    return [
        int(parse_qs(urlsplit(event["requestURI"]).query)["limit"][0])
        for event in plane.audit_events(user)
        if event.get("verb") == "list"
    ]


async def test_a_page_too_large_is_asked_for_again_with_fewer_objects(
    cluster: TestCluster, admin_api: Api, namespace: str, monkeypatch: Any
) -> None:
    """Six ConfigMaps of 200 KB, then ten small ones, listed with a 512 KiB page cap and a
    300 KiB target. The first pages (all six big ones, 1.2 MB) are dropped and asked for again
    with an eighth of the objects until one fits; one big object a page follows; after the first
    small page the limit goes back up (300 KiB at its size per object). Nothing is missed, and
    the requests are read from the apiserver's audit log."""
    plane = local_plane(cluster)
    monkeypatch.setattr(reloader.watch, "PAGE_MAX_BYTES", 512 * 1024)
    monkeypatch.setattr(reloader.watch, "PAGE_TARGET_BYTES", 300 * 1024)
    big, small = [f"big-{i}" for i in range(6)], [f"small-{i}" for i in range(10)]
    for name in big:
        await create(admin_api, namespace, name, {"v": name * 40_000})
    for name in small:
        await create(admin_api, namespace, name, {"v": name})
    user = f"pages-{namespace}"
    api, watched = await audited_informer(plane, user, namespace)
    task = await run_until_synced(watched)
    try:
        assert sorted(watched.in_namespace(namespace)) == sorted(big + small)
        for name in big:
            entry = watched.get(namespace, name)
            assert entry is not None and len(entry[1]) > 200_000
        limits = list_limits(plane, user)
        assert limits[:4] == [500, 62, 7, 1], limits  # 1.2 MB, 1.2 MB, 1.2 MB, then one fits
        assert limits[4:10] == [1] * 6, limits  # one big object a page, then the first small
        assert len(limits) == 11 and limits[10] > 100, limits  # back up: the rest in one page
    finally:
        await stop(task)
        await api.close()


async def test_a_listed_object_is_let_go_before_the_next_is_read(admin_api: Api) -> None:
    """The page path holds no listed object while the next one is decoded (``pages.ListPage``
    decodes it when asked for it): what one object leaves behind is then reused by the next
    rather than kept among the snapshots made meanwhile."""
    watched = configmap_informer(admin_api, "default", stall_timeout=60)
    holders: list[int] = []

    def listed() -> Iterator[RawObject]:
        first: list[RawObject] = [{"metadata": {"name": "a", "namespace": "default"}}]
        held = first[0]
        yield first.pop()
        holders.append(sys.getrefcount(held))  # asked for the next one
        yield {"metadata": {"name": "b", "namespace": "default"}}

    watched._upsert_page(listed(), {})
    assert holders == [2]  # ``held`` and the call's argument
    assert sorted(watched.in_namespace("default")) == ["a", "b"]


async def test_relist_after_410_synthesises_deletes_missed_while_down(
    cluster: TestCluster,
    admin_api: Api,
    namespace: str,
    informer: tuple[Informer[Any], Recorder],
) -> None:
    """1. The informer watches configmaps a and b.
    2. The apiserver stops; b is deleted straight from etcd; the apiserver starts again.
    Result: the resumed watch gets 410 (its resourceVersion predates the new watch cache), the
    informer relists and synthesises the delete of b it never saw as an event.
    """
    plane = local_plane(cluster)
    watched, recorder = informer
    await create(admin_api, namespace, "a", {"v": "1"})
    await create(admin_api, namespace, "b", {"v": "1"})
    task = await run_until_synced(watched)
    try:
        await asyncio.to_thread(plane.stop_apiserver)
        assert await asyncio.to_thread(plane.etcd_delete, f"/registry/configmaps/{namespace}/b")
        await asyncio.to_thread(plane.start_apiserver)

        async def b_gone() -> bool:
            return watched.get(namespace, "b") is None

        await wait_for(b_gone, timeout=60, message="the delete made behind the watch is noticed")
        assert recorder.deleted() == {"b"}
        assert watched.get(namespace, "a") is not None
        stats = watched.statistics()
        assert stats.restarts >= 1, stats
        assert stats.relists >= 1, stats
    finally:
        await stop(task)


async def test_stall_watchdog_reconnects_a_silent_watch(
    cluster: TestCluster, admin_api: Api, namespace: str
) -> None:
    """A frozen apiserver keeps the TCP connection open and sends nothing; after the stall timeout
    (3 s here) the informer drops the connection and opens a new watch, and misses nothing
    afterwards. The new watch is read from the apiserver's audit log, not the informer's count."""
    plane = local_plane(cluster)
    user = f"stall-{namespace}"
    api, watched = await audited_informer(plane, user, namespace, stall_timeout=3)
    task = await run_until_synced(watched)

    def watches_opened() -> int:
        return len({e["auditID"] for e in plane.audit_events(user) if e.get("verb") == "watch"})

    try:

        async def first_watch_logged() -> bool:
            return watches_opened() >= 1

        await wait_for(first_watch_logged, timeout=20, message="the first watch in the audit log")
        before = watches_opened()
        plane.freeze_apiserver()
        try:
            await asyncio.sleep(5)  # longer than the stall timeout: the watchdog has fired
        finally:
            plane.thaw_apiserver()

        async def reopened() -> bool:
            return watches_opened() > before

        await wait_for(reopened, timeout=20, message="a new watch request after the stall")
        await create(admin_api, namespace, "after", {"v": "1"})

        async def seen() -> bool:
            return watched.get(namespace, "after") is not None

        await wait_for(seen, timeout=60, message="events after the stall")
    finally:
        await stop(task)
        await api.close()


async def test_status_updates_refresh_a_workload_without_reading_it_whole(
    admin_api: Api, namespace: str
) -> None:
    """A Deployment created after the sync is read whole, and again when the Deployment controller
    sets its revision annotation; the status updates that follow (in the informer's event count,
    and in the resourceVersion it keeps, which must be the server's) only refresh the stored
    snapshot: fewer reads than events. A change of the pod template is read whole again, and the
    snapshot follows it."""
    kind = KINDS["Deployment"]
    context = CONTEXT
    reads = 0

    def transform(obj: RawObject) -> WorkloadSnapshot:
        nonlocal reads
        reads += 1
        return workload_snapshot(kind, obj, context=context)

    watched = Informer[WorkloadSnapshot](
        api=admin_api,
        resource=kind.resource,
        transform=transform,
        namespaces=[namespace],
        refresh=refreshed_workload,
    )
    task = await run_until_synced(watched)
    path = kind.resource.object_path(namespace, "web")
    try:
        await admin_api.create(kind.resource.collection_path(namespace), deployment("web"))

        async def caught_up(generation: int) -> bool:
            served = await admin_api.get(path)
            status = served.get("status") or {}
            cached = watched.get(namespace, "web")
            return (
                status.get("observedGeneration") == generation
                and cached is not None
                and cached.resource_version == served["metadata"]["resourceVersion"]
            )

        await wait_for(lambda: caught_up(1), message="the status update of generation 1 cached")
        # Read whole: the creation, and the controller's revision annotation; not its statuses.
        assert 1 <= reads < watched.statistics().events, (reads, watched.statistics())
        before = reads
        marker = {"spec": {"template": {"metadata": {"annotations": {"changed": "yes"}}}}}
        await admin_api.patch(path, marker, patch_type="strategic")
        await wait_for(lambda: caught_up(2), message="the status update of generation 2 cached")
        assert before < reads < watched.statistics().events, (reads, watched.statistics())
        snapshot = watched.get(namespace, "web")
        assert snapshot is not None and snapshot == workload_snapshot(
            kind, await admin_api.get(path), context=context
        )
    finally:
        await stop(task)
