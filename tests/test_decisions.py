"""Decisions that are never wrong, against a real API server (issue 9).

Every "must not restart" change is made alone and watched for a quiet period; then a change that
must restart does, once, so the controller was alive all along. Restarts are read from the server:
ReplicaSets owned by the Deployment (by uid, so a deleted namesake's do not count) and the restart
marker on the pod template.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from reloader.app import Controller
from reloader.digests import RECORD_VERSION, DigestKey, Recorded, decode_record
from reloader.kube import ApiNotFound
from reloader.model import KINDS, NAMESPACES, RECORD_ANNOTATION
from tests.scenario import (
    TEST_KEY,
    Cluster,
    container,
    deployment,
    env_from,
    scenario,
    wait_for,
)

pytestmark = pytest.mark.cluster
AUTO = {"reloader.stakater.com/auto": "true"}
QUIET = 2.5
"""Longer than the debounce (0.2 s) plus a sync and a patch, with room for a slow shared machine."""
DEPLOYMENTS = KINDS["Deployment"].resource


@contextlib.asynccontextmanager
async def other_namespace(scene: Cluster) -> AsyncIterator[Cluster]:
    name = f"{scene.namespace[:55]}-b"
    await scene.api.create(NAMESPACES.collection_path(None), {"metadata": {"name": name}})
    try:
        async with scenario(scene.api, name) as other:
            yield other
    finally:
        with contextlib.suppress(ApiNotFound):
            await scene.api.delete(f"{NAMESPACES.collection_path(None)}/{name}")


def record_of(obj: dict[str, Any]) -> Recorded:
    record = decode_record(obj["metadata"].get("annotations", {}).get(RECORD_ANNOTATION))
    assert record is not None, "no record on the workload"
    return record


async def wait_record(scene: Cluster, name: str, *, other_than: Recorded | None) -> Recorded:
    """The record on Deployment ``name`` once it differs from ``other_than``."""

    async def changed() -> Recorded | None:
        obj = await scene.get_deployment(name)
        found = decode_record(obj["metadata"].get("annotations", {}).get(RECORD_ANNOTATION))
        return found if found is not None and found != other_than else None

    return await wait_for(changed, message=f"a new record on {name}")


async def owned_sets(scene: Cluster, name: str) -> set[str]:
    """ReplicaSets of the Deployment ``name`` that exists now (matched by its uid)."""
    uid = (await scene.get_deployment(name))["metadata"]["uid"]
    page = await scene.api.list_page(
        f"/apis/apps/v1/namespaces/{scene.namespace}/replicasets", params=[]
    )
    return {
        rs["metadata"]["name"]
        for rs in page.get("items", [])
        if any(o.get("uid") == uid for o in rs["metadata"].get("ownerReferences", []))
    }


async def assert_sets_stay(scene: Cluster, name: str, count: int, quiet: float = QUIET) -> None:
    """Exactly ``count`` ReplicaSets of the current Deployment, now and after ``quiet`` seconds."""

    async def enough() -> bool:
        return len(await owned_sets(scene, name)) >= count

    await wait_for(enough, message=f"{count} ReplicaSets of {name}")
    await asyncio.sleep(quiet)
    found = await owned_sets(scene, name)
    assert len(found) == count, f"{name} has ReplicaSets {sorted(found)}, expected {count}"


async def restarts_once_for(scene: Cluster, name: str, config: str, *, sets: int) -> None:
    """Liveness: a data change of ConfigMap ``config`` restarts ``name`` once, naming it."""
    before = await scene.marker("Deployment", name)
    await scene.patch_configmap(config, {"data": {"a": "changed-for-liveness"}})
    marker = await scene.wait_marker("Deployment", name, other_than=before)
    assert f'"name":"{config}"' in marker and '"type":"CONFIGMAP"' in marker
    await assert_sets_stay(scene, name, sets)


async def patch_deployment(scene: Cluster, name: str, patch: dict[str, Any]) -> None:
    await scene.api.patch(DEPLOYMENTS.object_path(scene.namespace, name), patch, patch_type="merge")


async def test_equal_secrets_in_two_namespaces_record_different_digests(scene: Cluster) -> None:
    """A tenant who creates a Secret with a guessed value cannot compare digests with another
    namespace's, nor with another Secret of equal content in the same namespace."""
    uses_both = [container(envFrom=[{"secretRef": {"name": "db"}}, {"secretRef": {"name": "db2"}}])]
    async with other_namespace(scene) as other:
        for cluster in (scene, other):
            await cluster.create_secret("db", {"password": "1234"})
            await cluster.create_secret("db2", {"password": "1234"})
            await cluster.create_workload(deployment("api", annotations=AUTO, containers=uses_both))
        await scene.start_controller(namespaces=[scene.namespace, other.namespace])

        mine = record_of(await scene.wait_recorded("api")).as_dict()
        theirs = record_of(await other.wait_recorded("api")).as_dict()

    assert mine["Secret/db"] != theirs["Secret/db"], "equal content, equal digest across namespaces"
    assert mine["Secret/db"] != mine["Secret/db2"], "equal content, equal digest across names"


async def test_key_ref_to_env_from_rolls_once_then_data_restarts(scene: Cluster) -> None:
    """Reading the whole ConfigMap instead of one key is a template edit: its own rollout, and no
    second one from the controller; the record is made again for the new template."""
    await scene.create_configmap("cfg", {"a": "1", "b": "2"})
    key_ref = {"valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(env=[{"name": "A", **key_ref}])])
    )
    await scene.start_controller()
    first = record_of(await scene.wait_recorded("web"))
    await assert_sets_stay(scene, "web", 1)

    new_spec = {"containers": [container(**env_from("ConfigMap", "cfg"))]}
    await patch_deployment(scene, "web", {"spec": {"template": {"spec": new_spec}}})

    second = await wait_record(scene, "web", other_than=first)
    await assert_sets_stay(scene, "web", 2)
    assert await scene.marker("Deployment", "web") is None, "restarted after the template edit"
    assert second.template != first.template
    await restarts_once_for(scene, "web", "cfg", sets=3)


@pytest.mark.parametrize("reload_on_create", [False, True], ids=["default", "reload-on-create"])
async def test_opt_out_then_opt_in_does_not_restart(scene: Cluster, reload_on_create: bool) -> None:
    """Opting in again is not a config change, even if the config changed meanwhile."""
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    await scene.start_controller(reload_on_create=reload_on_create)
    opted_in = record_of(await scene.wait_recorded("web"))

    await patch_deployment(
        scene, "web", {"metadata": {"annotations": {"reloader.stakater.com/auto": "false"}}}
    )
    opted_out = await wait_record(scene, "web", other_than=opted_in)
    assert opted_out.configs == ()
    await scene.patch_configmap("cfg", {"data": {"a": "while-opted-out"}})
    await patch_deployment(scene, "web", {"metadata": {"annotations": AUTO}})

    await wait_record(scene, "web", other_than=opted_out)
    await assert_sets_stay(scene, "web", 1)
    await restarts_once_for(scene, "web", "cfg", sets=2)


async def test_re_created_workload_with_a_copied_record_is_re_recorded(scene: Cluster) -> None:
    """``helm upgrade --force`` or ``kubectl replace --force`` of a saved object: a new uid under
    the same name, carrying a record that describes the old object's pods."""
    await scene.create_configmap("cfg", {"a": "1"})
    body = deployment(
        "web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))]
    )
    await scene.create_workload(body)
    controller = await scene.start_controller()
    saved = (await scene.wait_recorded("web"))["metadata"]["annotations"][RECORD_ANNOTATION]
    await scene.patch_configmap("cfg", {"data": {"a": "2"}})
    await scene.wait_marker("Deployment", "web")

    await scene.api.delete(DEPLOYMENTS.object_path(scene.namespace, "web"))

    async def gone() -> bool:
        try:
            await scene.get_deployment("web")
        except ApiNotFound:
            return True
        return False

    await wait_for(gone, message="the Deployment deleted")
    body["metadata"]["annotations"][RECORD_ANNOTATION] = saved
    await scene.create_workload(body)
    created = await scene.get_deployment("web")

    rewritten = await wait_record(scene, "web", other_than=decode_record(saved))
    await assert_sets_stay(scene, "web", 1)
    # A restart this soon after creation can merge into the first ReplicaSet: the pod template,
    # as created, is the evidence that none was made (a record write touches metadata only).
    now = (await scene.get_deployment("web"))["spec"]["template"]
    assert now == created["spec"]["template"], "the re-created Deployment was restarted"
    assert rewritten.uid == (await scene.get_deployment("web"))["metadata"]["uid"]
    assert resets(controller, "uid") == 1.0
    await restarts_once_for(scene, "web", "cfg", sets=2)


def resets(controller: Controller, reason: str) -> float:
    """Records set aside, as the controller counts them for its operators."""
    registry = controller.metrics.registry
    return registry.get_sample_value("reloader_record_resets_total", {"reason": reason}) or 0.0


async def test_stale_record_put_back_is_re_recorded(scene: Cluster) -> None:
    """A GitOps self-heal re-applies a record saved before the last restart."""
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "cfg"))])
    )
    controller = await scene.start_controller()
    saved = (await scene.wait_recorded("web"))["metadata"]["annotations"][RECORD_ANNOTATION]
    await scene.patch_configmap("cfg", {"data": {"a": "2"}})
    await scene.wait_marker("Deployment", "web")
    await assert_sets_stay(scene, "web", 2)

    await patch_deployment(scene, "web", {"metadata": {"annotations": {RECORD_ANNOTATION: saved}}})

    await wait_record(scene, "web", other_than=decode_record(saved))
    await assert_sets_stay(scene, "web", 2)
    assert resets(controller, "stale") == 1.0
    await restarts_once_for(scene, "web", "cfg", sets=3)


async def test_config_created_after_the_workload_does_not_restart_by_default(
    scene: Cluster,
) -> None:
    """Stakater reloads on a config's creation only with ``--reload-on-create``."""
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "late"))])
    )
    await scene.start_controller()
    first = record_of(await scene.wait_recorded("web"))

    await scene.create_configmap("late", {"a": "1"})

    await wait_record(scene, "web", other_than=first)
    await assert_sets_stay(scene, "web", 1)
    await restarts_once_for(scene, "web", "late", sets=2)


async def test_named_config_created_after_a_new_workload_does_not_restart_by_default(
    scene: Cluster,
) -> None:
    """As Stakater's e2e runs it: controller first, then the workload, then its ConfigMap."""
    await scene.start_controller()
    named = {"configmap.reloader.stakater.com/reload": "late"}
    await scene.create_workload(deployment("web", annotations=named))
    first = record_of(await scene.wait_recorded("web"))

    await scene.create_configmap("late", {"a": "1"})

    await wait_record(scene, "web", other_than=first)
    await assert_sets_stay(scene, "web", 1)
    await restarts_once_for(scene, "web", "late", sets=2)


async def test_upgrade_from_the_unbound_record_format_restarts_nothing(scene: Cluster) -> None:
    """Records of controllers before version 2 hold digests not bound to the config: they differ
    from today's for the same content, so comparing them would restart every workload."""
    await scene.create_configmap("cfg", {"a": "1"})
    key_id = DigestKey.from_secret(TEST_KEY).key_id
    old = f'{{"keyId":"{key_id}","configs":{{"ConfigMap/cfg":"{"0" * 32}"}}}}'
    await scene.create_workload(
        deployment(
            "web",
            annotations={**AUTO, RECORD_ANNOTATION: old},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    created = (await scene.get_deployment("web"))["spec"]["template"]
    await scene.start_controller()

    rewritten = await wait_record(scene, "web", other_than=decode_record(old))
    await assert_sets_stay(scene, "web", 1)
    assert (await scene.get_deployment("web"))["spec"]["template"] == created
    assert rewritten.version == RECORD_VERSION
    await restarts_once_for(scene, "web", "cfg", sets=2)
