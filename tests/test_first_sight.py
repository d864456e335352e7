"""First sight: the first record of a workload is a compare-and-swap on the record annotation.

The Deployment controller updates a new Deployment's status right after it is created, so a
record patch guarded by the resourceVersion the controller saw used to conflict (409) for nearly
every new workload. These tests freeze the controller's cache (informers listed, then stopped)
so the race is not left to timing: the server's object then moves on while the snapshot stays.

- a status update after the snapshot no longer fails the record (it did: 409);
- a record written after the snapshot (our own earlier write not in the cache yet, or a restart)
  still fails the write, and the record on the server is left as it was: an unguarded patch
  would overwrite it with digests of configs the pods may not have been started with;
- a workload without any annotation (the JSON patch cannot add to a missing map) is still recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from reloader.annotations import AnnotationNames
from reloader.digests import DigestKey, Recorded, encode_record
from reloader.kube import ApiConflict
from reloader.metrics import Metrics
from reloader.model import CONFIG_RESOURCES, KINDS, RECORD_ANNOTATION, WorkloadKey
from reloader.queue import TokenBucket
from reloader.restart import Restarter, RestartFailed, RestartPolicy
from reloader.snapshots import (
    ConfigSnapshot,
    SnapshotContext,
    WorkloadSnapshot,
    config_snapshot,
    workload_snapshot,
)
from reloader.watch import Informer
from tests.scenario import TEST_KEY, Cluster, container, deployment, env_from

AUTO = {"reloader.stakater.com/auto": "true"}
DEPLOYMENTS = KINDS["Deployment"]


async def frozen_restarter(scene: Cluster, *, auto_reload_all: bool = False) -> Restarter:
    """A Restarter over caches listed from the server now and then never updated again."""
    context = SnapshotContext(
        digest_key=DigestKey.from_secret(TEST_KEY),
        names=AnnotationNames(),
        auto_reload_all=auto_reload_all,
    )
    namespaces = [scene.namespace]
    configs = {
        kind: Informer[ConfigSnapshot](
            api=scene.api,
            resource=resource,
            transform=lambda obj, kind=kind: config_snapshot(kind, obj, context=context),  # type: ignore[misc]
            namespaces=namespaces,
        )
        for kind, resource in CONFIG_RESOURCES.items()
    }
    workloads = Informer[WorkloadSnapshot](
        api=scene.api,
        resource=DEPLOYMENTS.resource,
        transform=lambda obj: workload_snapshot(DEPLOYMENTS, obj, context=context),
        namespaces=namespaces,
    )
    informers: list[Informer[Any]] = [*configs.values(), workloads]
    tasks = [asyncio.create_task(informer.run()) for informer in informers]
    await asyncio.wait_for(asyncio.gather(*(i.wait_synced() for i in informers)), timeout=30)
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return Restarter(
        api=scene.api,
        workloads={"Deployment": workloads},
        configs=configs,
        digest_key=context.digest_key,
        policy=RestartPolicy(reload_on_create=False, reload_on_delete=False, min_interval=0),
        restart_budget=TokenBucket(rate=1000, burst=1000),
        record_budget=TokenBucket(rate=1000, burst=1000),
        metrics=Metrics(),
        changed_since=lambda key: None,
    )


async def update_status(scene: Cluster, name: str) -> None:
    """What the Deployment controller does right after a Deployment is created: a status write
    (a condition of a type of its own, with a new message, so the write is never a no-op)."""
    path = DEPLOYMENTS.resource.object_path(scene.namespace, name) + "/status"
    condition = {"type": "BenchProbe", "status": "True", "message": str(time.time())}
    patch = {"status": {"conditions": [condition]}}
    await scene.api.patch(path, patch, patch_type="strategic")


async def server_record(scene: Cluster, name: str) -> str | None:
    obj = await scene.get_workload("Deployment", name)
    annotations: dict[str, str] = obj["metadata"].get("annotations") or {}
    return annotations.get(RECORD_ANNOTATION)


@pytest.mark.cluster
async def test_a_status_update_after_the_snapshot_does_not_fail_the_first_record(
    scene: Cluster,
) -> None:
    """Fails before the change: the record patch carried the snapshot's resourceVersion, which
    the status update made stale, so the server answered 409 (RestartFailed)."""
    await scene.create_configmap("cfg", {"a": "1"})
    body = deployment(
        "app", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))]
    )
    await scene.create_workload(body)
    restarter = await frozen_restarter(scene)
    key = WorkloadKey("Deployment", scene.namespace, "app")
    snapshot = restarter.current(key)
    assert snapshot is not None and not (snapshot.recorded and snapshot.recorded.usable)
    await update_status(scene, "app")
    server = await scene.get_workload("Deployment", "app")
    assert server["metadata"]["resourceVersion"] != snapshot.resource_version

    outcome = await restarter.sync(key)

    assert outcome.action == "record"
    assert await server_record(scene, "app") is not None


@pytest.mark.cluster
async def test_a_record_written_after_the_snapshot_is_never_overwritten(scene: Cluster) -> None:
    """The stale snapshot says "no record"; the server has one by now. The write must fail (and
    be decided again on fresh state), leaving the server's record as it is. A record patch
    without any precondition would pass the status test above and fail this one."""
    await scene.create_configmap("cfg", {"a": "1"})
    body = deployment(
        "app", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))]
    )
    await scene.create_workload(body)
    restarter = await frozen_restarter(scene)
    key = WorkloadKey("Deployment", scene.namespace, "app")
    theirs = encode_record(Recorded.of("other", {"ConfigMap/cfg": "0" * 16}))
    path = DEPLOYMENTS.resource.object_path(scene.namespace, "app")
    patch = {"metadata": {"annotations": {RECORD_ANNOTATION: theirs}}}
    await scene.api.patch(path, patch, patch_type="merge")

    with pytest.raises(RestartFailed) as failure:
        await restarter.sync(key)

    assert isinstance(failure.value.error, ApiConflict)
    assert failure.value.decision.action == "record"
    assert await server_record(scene, "app") == theirs


async def record_or_conflict(restarter: Restarter, key: WorkloadKey) -> bool:
    """True once recorded; False on a 409 (decided on a stale snapshot: the queue retries it)."""
    try:
        outcome = await restarter.sync(key)
    except RestartFailed as failure:
        if isinstance(failure.error, ApiConflict):
            return False
        raise
    return outcome.action == "record"


@pytest.mark.cluster
async def test_a_workload_without_annotations_is_still_recorded(scene: Cluster) -> None:
    """No ``metadata.annotations`` at all (auto-reload-all): the JSON patch cannot add to the
    missing map, so the guarded merge patch writes it. Its 409 (a status update raced it) is
    retried on fresh state, as the queue would."""
    await scene.create_configmap("cfg", {"a": "1"})
    body = deployment("plain", containers=[container(**env_from("ConfigMap", "cfg"))])
    await scene.create_workload(body)
    key = WorkloadKey("Deployment", scene.namespace, "plain")
    conflicts = 0
    for _ in range(10):
        restarter = await frozen_restarter(scene, auto_reload_all=True)
        snapshot = restarter.current(key)
        assert snapshot is not None and not (snapshot.recorded and snapshot.recorded.usable)
        if await record_or_conflict(restarter, key):
            break
        conflicts += 1
    assert await server_record(scene, "plain") is not None, f"{conflicts} conflicts"
