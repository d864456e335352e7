"""End-to-end behaviour of the controller against a real API server and controller-manager.

A restart is observed the way a user sees it: the Deployment controller creates a new ReplicaSet.
"Exactly N" is checked after a quiet period, so a late duplicate restart fails the test. A change
that must not restart is made alone and judged after a quiet period; then a change that must
restart shows the controller was alive (``Cluster.assert_not_restarted_then_restarts``). What the
controller wrote is read from the apiserver's audit log, not from the controller's own counters.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

import pytest

from reloader.digests import decode_record
from reloader.model import KINDS, LAST_RELOADED_FROM, RECORD_ANNOTATION
from tests.conftest import TestCluster
from tests.scenario import (
    Change,
    Cluster,
    audited_writes,
    container,
    deployment,
    env_from,
    wait_for,
)

pytestmark = pytest.mark.cluster
AUTO = {"reloader.stakater.com/auto": "true"}
CFG = ("ConfigMap", "cfg")


def patching(scene: Cluster, name: str, patch: dict[str, Any]) -> Change:
    """A merge patch of ConfigMap ``name``, for later."""

    async def make() -> None:
        await scene.patch_configmap(name, patch)

    return make


async def test_configmap_change_rolls_the_deployment_once(scene: Cluster) -> None:
    """1. A Deployment with auto uses a ConfigMap through envFrom; the controller records it.
    2. The ConfigMap's data changes.
    Result: exactly one new ReplicaSet, a Reloaded Event, and the marker names the ConfigMap.
    """
    await scene.create_configmap("app-config", {"level": "info"})
    await scene.create_workload(
        deployment(
            "web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "app-config"))]
        )
    )
    await scene.start_controller()
    await scene.wait_recorded("web")
    await scene.assert_replica_sets_stay("web", 1)

    await scene.patch_configmap("app-config", {"data": {"level": "debug"}})

    await scene.assert_replica_sets_stay("web", 2)
    obj = await scene.get_deployment("web")
    marker = obj["spec"]["template"]["metadata"]["annotations"][LAST_RELOADED_FROM]
    assert '"name":"app-config"' in marker and '"type":"CONFIGMAP"' in marker
    assert await scene.events("Reloaded")


async def test_the_synced_cache_is_kept_out_of_full_collections_until_stop(
    scene: Cluster,
) -> None:
    """1. A controller syncs and records a workload.
    Result: what was alive after the sync is frozen (``gc.freeze``), so a full collection no longer
    walks the cache while restarts are being made.
    2. The controller stops.
    Result: nothing is left frozen; what it froze is collectable again."""
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller()
    await scene.wait_recorded("web")

    assert gc.get_freeze_count() > 0

    await scene.stop_controllers()

    assert gc.get_freeze_count() == 0


async def test_the_work_tables_are_shrunk_once_the_first_pass_is_through(
    scene: Cluster,
) -> None:
    """1. 100 opted-in Deployments exist when the controller starts: at the sync every one is
    queued for its first look.
    Result: once every one is recorded, the queue's dedup set is sized for what it holds
    (nothing), not for the 100 of its fullest moment."""
    await scene.create_configmap("cfg", {"a": "1"})
    containers = [container(**env_from("ConfigMap", "cfg"))]
    await asyncio.gather(
        *(
            scene.create_workload(deployment(f"w{n}", annotations=AUTO, containers=containers))
            for n in range(100)
        )
    )
    controller = await scene.start_controller()
    dirty = controller.queue._dirty
    assert sys.getsizeof(dirty) > 2000, "the first pass was not queued at the sync"
    for n in range(100):
        await scene.wait_recorded(f"w{n}")

    async def shrunk() -> bool:
        return sys.getsizeof(dirty) < 1000

    await wait_for(shrunk, timeout=30, message="the queue's set shrinks after the first pass")


async def test_label_only_update_does_not_restart(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller()
    await scene.wait_recorded("web")

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=patching(scene, "cfg", {"metadata": {"labels": {"team": "x"}}}),
        right=patching(scene, "cfg", {"data": {"a": "2"}}),
        source=CFG,
    )


async def test_controller_restart_writes_nothing_when_nothing_changed(
    scene: Cluster, cluster: TestCluster
) -> None:
    """The restarted controller runs as a user of its own whose every request the apiserver's
    audit log records (local control plane; elsewhere only the objects are compared): after
    syncing an unchanged cluster it has written nothing at all, and its first write is the
    restart a change then calls for, which also shows the log would have caught a write."""
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller()
    before = (await scene.wait_recorded("web"))["metadata"]["annotations"][RECORD_ANNOTATION]
    plane, user = cluster.plane, f"reloader-{scene.namespace}"
    api = await scene.audited_api(plane, user) if plane is not None else scene.api

    async def restart_controller() -> None:
        await scene.stop_controllers()
        await scene.start_controller(api=api)

    async def then_change() -> None:
        obj = await scene.get_deployment("web")
        assert obj["metadata"]["annotations"][RECORD_ANNOTATION] == before, "re-recorded"
        if plane is not None:
            assert audited_writes(plane, user) == [], "the restarted controller wrote"
        await scene.patch_configmap("cfg", {"data": {"a": "2"}})

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=restart_controller, right=then_change, source=CFG
    )
    if plane is not None:
        assert "patch deployments/web" in audited_writes(plane, user)


async def test_change_while_controller_down_rolls_exactly_once_after_start(scene: Cluster) -> None:
    await scene.create_secret("db", {"password": "old"})
    await scene.create_workload(
        deployment("api", annotations=AUTO, containers=[container(**env_from("Secret", "db"))])
    )
    await scene.start_controller()
    await scene.wait_recorded("api")
    await scene.stop_controllers()

    await scene.set_secret("db", {"password": "rotated"})
    await scene.start_controller()

    await scene.assert_replica_sets_stay("api", 2)


async def test_first_sight_records_without_restarting(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller()

    obj = await scene.wait_recorded("web")

    record = decode_record(obj["metadata"]["annotations"][RECORD_ANNOTATION])
    assert record is not None and [name for name, _ in record.configs] == ["ConfigMap/cfg"]
    assert "password" not in obj["metadata"]["annotations"][RECORD_ANNOTATION]
    await scene.assert_replica_sets_stay("web", 1)


async def test_burst_over_three_secrets_gives_one_rollout(scene: Cluster) -> None:
    """The CSI driver rotates three Secrets used by one Deployment within the debounce window."""
    names = ["tls", "db", "api-token"]
    for name in names:
        await scene.create_secret(name, {"v": "1"})
    containers = [container(envFrom=[{"secretRef": {"name": n}} for n in names])]
    await scene.create_workload(deployment("svc", annotations=AUTO, containers=containers))
    # A window wide enough for three writes on a loaded machine; the quiet period outlasts it.
    window = 3.0
    await scene.start_controller(debounce_seconds=window)
    await scene.wait_recorded("svc")

    started = time.monotonic()
    for name in names:
        await scene.set_secret(name, {"v": "2"})
    took = time.monotonic() - started
    assert took < window, f"the burst took {took:.1f}s, longer than the window: too slow a machine"

    await scene.assert_replica_sets_stay("svc", 2, quiet=window + 1)


async def test_flapping_secret_is_held_to_the_minimum_interval(scene: Cluster) -> None:
    """A Secret rewritten 20 times in a few seconds must not create 20 ReplicaSets."""
    await scene.create_secret("flappy", {"v": "0"})
    await scene.create_workload(
        deployment(
            "victim", annotations=AUTO, containers=[container(**env_from("Secret", "flappy"))]
        )
    )
    await scene.start_controller(debounce_seconds=0.05, min_restart_interval_seconds=30)
    await scene.wait_recorded("victim")

    for value in range(1, 21):
        await scene.set_secret("flappy", {"v": str(value)})

    await scene.assert_replica_sets_stay("victim", 2, quiet=3)


def _volume(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    source = (
        {"configMap": {"name": name}} if kind == "ConfigMap" else {"secret": {"secretName": name}}
    )
    for value in source.values():
        value.update(extra)
    return {"name": "v", **source}


MOUNT = {"volumeMounts": [{"name": "v", "mountPath": "/etc/cfg"}]}
REFERENCES = [
    pytest.param(
        {"containers": [container(**env_from("ConfigMap", "cfg"))]},
        "ConfigMap",
        id="envFrom-configmap",
    ),
    pytest.param(
        {"containers": [container(**env_from("Secret", "cfg"))]}, "Secret", id="envFrom-secret"
    ),
    pytest.param(
        {
            "containers": [
                container(
                    env=[
                        {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}
                    ]
                )
            ]
        },
        "ConfigMap",
        id="valueFrom-configmap",
    ),
    pytest.param(
        {
            "containers": [
                container(
                    env=[{"name": "A", "valueFrom": {"secretKeyRef": {"name": "cfg", "key": "a"}}}]
                )
            ]
        },
        "Secret",
        id="valueFrom-secret",
    ),
    pytest.param(
        {"containers": [container(**MOUNT)], "volumes": [_volume("ConfigMap", "cfg")]},
        "ConfigMap",
        id="volume-configmap",
    ),
    pytest.param(
        {"containers": [container(**MOUNT)], "volumes": [_volume("Secret", "cfg")]},
        "Secret",
        id="volume-secret",
    ),
    pytest.param(
        {
            "containers": [container(**MOUNT)],
            "volumes": [{"name": "v", "projected": {"sources": [{"configMap": {"name": "cfg"}}]}}],
        },
        "ConfigMap",
        id="projected-configmap",
    ),
    pytest.param(
        {
            "containers": [container(**MOUNT)],
            "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "cfg"}}]}}],
        },
        "Secret",
        id="projected-secret",
    ),
    pytest.param(
        {
            "containers": [container()],
            "init_containers": [container("init", **env_from("ConfigMap", "cfg"))],
        },
        "ConfigMap",
        id="envFrom-in-initContainer",
    ),
]


@pytest.mark.parametrize(("spec", "kind"), REFERENCES)
async def test_every_reference_kind_triggers_a_restart(
    scene: Cluster, spec: dict[str, Any], kind: str
) -> None:
    if kind == "ConfigMap":
        await scene.create_configmap("cfg", {"a": "1"})
    else:
        await scene.create_secret("cfg", {"a": "1"})
    await scene.create_workload(deployment("web", annotations=AUTO, **spec))
    await scene.start_controller()
    await scene.wait_recorded("web")

    if kind == "ConfigMap":
        await scene.patch_configmap("cfg", {"data": {"a": "2"}})
    else:
        await scene.set_secret("cfg", {"a": "2"})

    await scene.assert_replica_sets_stay("web", 2)


async def test_change_to_an_unused_key_does_not_restart(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"used": "1", "unused": "1"})
    env = [{"name": "U", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "used"}}}]
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(env=env)])
    )
    await scene.start_controller()
    await scene.wait_recorded("web")

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=patching(scene, "cfg", {"data": {"unused": "2"}}),
        right=patching(scene, "cfg", {"data": {"used": "2"}}),
        source=CFG,
    )


async def test_optional_reference_created_later_is_picked_up(scene: Cluster) -> None:
    """The ConfigMap does not exist when the Deployment is made; it is created, then changed."""
    ref = {"envFrom": [{"configMapRef": {"name": "late", "optional": True}}]}
    await scene.create_workload(deployment("web", annotations=AUTO, containers=[container(**ref)]))
    await scene.start_controller()
    await scene.wait_recorded("web")

    async def create() -> None:
        await scene.create_configmap("late", {"a": "1"})

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=create,
        right=patching(scene, "late", {"data": {"a": "2"}}),
        source=("ConfigMap", "late"),
    )


async def test_deleted_config_does_not_restart_by_default(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller()
    await scene.wait_recorded("web")

    async def delete() -> None:
        await scene.delete_configmap("cfg")

    async def recreate_changed() -> None:  # the record kept its entry: new content restarts
        await scene.create_configmap("cfg", {"a": "2"})

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=delete, right=recreate_changed, source=CFG
    )


async def test_deleted_config_restarts_with_reload_on_delete(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller(reload_on_delete=True)
    await scene.wait_recorded("web")

    await scene.delete_configmap("cfg")

    await scene.assert_replica_sets_stay("web", 2)


async def test_invalid_annotation_is_reported_and_ignored(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    annotations = {"reloader.stakater.com/auto": "yes please"}
    await scene.create_workload(
        deployment(
            "web", annotations=annotations, containers=[container(**env_from("ConfigMap", "cfg"))]
        )
    )
    await scene.start_controller()

    events = await wait_for(lambda: scene.events("InvalidAnnotation"), message="a Warning Event")

    assert "yes please" in events[0]["message"] and events[0]["type"] == "Warning"

    async def fix_then_change() -> None:
        path = KINDS["Deployment"].resource.object_path(scene.namespace, "web")
        await scene.api.patch(path, {"metadata": {"annotations": AUTO}}, patch_type="merge")
        await scene.wait_recorded("web")  # valid now: first sight, recorded
        await scene.patch_configmap("cfg", {"data": {"a": "3"}})

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=patching(scene, "cfg", {"data": {"a": "2"}}),
        right=fix_then_change,
        source=CFG,
    )


async def test_key_rotation_re_records_without_restarting(scene: Cluster) -> None:
    """Digests made under another key are not comparable: re-recorded, never a restart."""
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller(digest_key=b"the-old-digest-key-0123456789")
    old = decode_record(
        (await scene.wait_recorded("web"))["metadata"]["annotations"][RECORD_ANNOTATION]
    )
    await scene.stop_controllers()

    async def re_recorded() -> bool:
        obj = await scene.get_deployment("web")
        record = decode_record(obj["metadata"]["annotations"][RECORD_ANNOTATION])
        return record is not None and old is not None and record.key_id != old.key_id

    async def rotate() -> None:
        await scene.start_controller(digest_key=b"the-new-digest-key-9876543210")
        await wait_for(re_recorded, message="the record re-made under the new key")

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=rotate, right=patching(scene, "cfg", {"data": {"a": "2"}}), source=CFG
    )
