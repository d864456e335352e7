"""The Secrets Store CSI integration (``--enable-csi-integration``, ``reloader/csi.py``).

On the real server a minimal CustomResourceDefinition for SecretProviderClassPodStatus stands in
for the driver's; the test writes the status objects the driver would (one per pod and class, owned
by the pod, listing each object's id and version). The kube-controller-manager runs the Deployment
and ReplicaSet controllers, so pods exist with their ownerReferences, though no kubelet ever runs
them. A restart is seen the way a user sees it: a new ReplicaSet.

The pure parts (references, annotations, the transform, the decision) are checked first, without
a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, cast

import pytest

from reloader.annotations import DEFAULT_NAMES, parse_policy
from reloader.csi import POD_STATUSES, PodStatus, pod_status
from reloader.decide import dependencies
from reloader.digests import DigestKey, decode_record
from reloader.kube import Api, ApiConflict, ApiNotFound
from reloader.model import (
    KINDS,
    RECORD_ANNOTATION,
    SPC,
    ConfigRef,
    RawObject,
    WorkloadKey,
    workload_config_name,
)
from reloader.references import find_references
from reloader.snapshots import ConfigSnapshot, SnapshotContext, workload_snapshot
from tests.conftest import TestCluster
from tests.scenario import (
    QUIET,
    TEST_KEY,
    Cluster,
    container,
    deployment,
    env_from,
    exists,
    refused,
    wait_for,
)

CLASS = "vault-db"
SPC_AUTO = {"secretproviderclass.reloader.stakater.com/auto": "true"}
AUTO = {"reloader.stakater.com/auto": "true"}
KEY = DigestKey.from_secret(TEST_KEY)
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
CRD_NAME = f"{POD_STATUSES.plural}.{POD_STATUSES.group}"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": POD_STATUSES.group,
        "scope": "Namespaced",
        "names": {
            "plural": POD_STATUSES.plural,
            "singular": "secretproviderclasspodstatus",
            "kind": POD_STATUSES.kind,
            "listKind": f"{POD_STATUSES.kind}List",
        },
        "versions": [
            {
                "name": POD_STATUSES.version,
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                },
            }
        ],
    },
}


def csi_volume(spc: str = CLASS) -> dict[str, Any]:
    return {
        "name": "secrets",
        "csi": {
            "driver": "secrets-store.csi.k8s.io",
            "readOnly": True,
            "volumeAttributes": {"secretProviderClass": spc},
        },
    }


MOUNTS = [container(volumeMounts=[{"name": "secrets", "mountPath": "/mnt/secrets"}])]


def raw_status(
    name: str, *, pod: str = "web-1", spc: str = CLASS, versions: dict[str, str] | None = None
) -> RawObject:
    objects = [{"id": i, "version": v} for i, v in (versions or {"db-password": "1"}).items()]
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": "u-1"}],
        },
        "status": {"podName": pod, "secretProviderClassName": spc, "objects": objects},
    }


# --- pure parts ---------------------------------------------------------------------------------


def test_a_csi_volume_references_its_class_only_with_the_integration() -> None:
    spec = {"containers": MOUNTS, "volumes": [csi_volume()]}
    assert find_references(spec) == ()
    assert set(find_references(spec, csi=True)) == {
        ConfigRef(SPC, CLASS, None, ("app",)),
    }


@pytest.mark.parametrize(
    ("meta", "template", "wanted"),
    [
        pytest.param(SPC_AUTO, {}, True, id="typed-auto"),
        pytest.param(AUTO, {}, True, id="auto-covers-classes"),
        pytest.param({}, SPC_AUTO, True, id="template-when-metadata-has-none"),
        pytest.param(
            {"secretproviderclass.reloader.stakater.com/reload": "other"},
            SPC_AUTO,
            False,
            id="metadata-named-list-hides-template-auto",
        ),
        pytest.param(
            {"secretproviderclass.reloader.stakater.com/reload": "vault-.*"}, {}, True, id="named"
        ),
        pytest.param(
            {**AUTO, "secretproviderclasses.exclude.reloader.stakater.com/reload": CLASS},
            {},
            False,
            id="excluded",
        ),
        pytest.param({"configmap.reloader.stakater.com/auto": "true"}, {}, False, id="other-kind"),
    ],
)
def test_class_annotations_follow_the_metadata_or_template_rule(
    meta: dict[str, str], template: dict[str, str], wanted: bool
) -> None:
    policy, problems = parse_policy(meta, template, names=DEFAULT_NAMES, auto_reload_all=False)
    assert problems == ()
    assert policy.wants(SPC, CLASS, referenced=True, match=False) is wanted


def test_the_transform_keeps_digests_of_versions_not_versions() -> None:
    status = pod_status(raw_status("s", versions={"db-password": "v-123456789"}), key=KEY)
    assert status.pod == "web-1" and status.pod_uid == "u-1" and status.spc == CLASS
    assert status.reports
    assert "v-123456789" not in repr(status)
    rotated = pod_status(raw_status("s", versions={"db-password": "v-2"}), key=KEY)
    assert rotated.versions != status.versions


def test_a_status_without_objects_reports_nothing() -> None:
    raw = raw_status("s")
    raw["status"]["objects"] = []
    assert not pod_status(raw, key=KEY).reports


def _web(**context: Any) -> Any:
    body = deployment("web", annotations=SPC_AUTO, containers=MOUNTS, volumes=[csi_volume()])
    ctx = SnapshotContext(digest_key=KEY, names=DEFAULT_NAMES, auto_reload_all=False, **context)
    return workload_snapshot(KINDS["Deployment"], cast(RawObject, body), context=ctx)


def _view(status: PodStatus) -> ConfigSnapshot:
    return ConfigSnapshot(SPC, "ns", status.spc, status.versions, False, False)


def test_a_class_no_pod_of_the_workload_reports_is_no_dependency() -> None:
    """Not a missing config: with reload-on-create its first report would restart a workload
    whose pods mounted it as it was. Another workload's view is not this one's."""
    web = _web(csi=True)
    other = workload_config_name(CLASS, WorkloadKey("Deployment", "ns", "other"))
    status = pod_status(raw_status("s"), key=KEY)
    assert dependencies(web, {SPC: {}}, key=KEY) == {}
    assert dependencies(web, {SPC: {other: _view(status)}}, key=KEY) == {}
    mine = workload_config_name(CLASS, WorkloadKey("Deployment", "", "web"))
    found = dependencies(web, {SPC: {mine: _view(status)}}, key=KEY)
    assert list(found) == [f"{SPC}/{CLASS}"] and found[f"{SPC}/{CLASS}"].digest


def test_without_the_integration_a_class_is_never_a_dependency() -> None:
    web = _web()
    mine = workload_config_name(CLASS, WorkloadKey("Deployment", "", "web"))
    status = pod_status(raw_status("s"), key=KEY)
    assert web.references == ()
    assert dependencies(web, {SPC: {mine: _view(status)}}, key=KEY) == {}


# --- on the real server ---------------------------------------------------------------------


def statuses_path(namespace: str) -> str:
    return POD_STATUSES.collection_path(namespace)


async def served(api: Api, namespace: str) -> bool:
    return await exists(api, statuses_path(namespace))


async def install_crd(api: Api, namespace: str) -> None:
    with contextlib.suppress(ApiConflict):
        await api.create(CRDS, CRD)
    await wait_for(lambda: served(api, namespace), message="the status CRD served")


async def remove_crd(api: Api) -> None:
    with contextlib.suppress(ApiNotFound):
        await api.delete(f"{CRDS}/{CRD_NAME}")

    async def gone() -> bool:
        return not await exists(api, f"{CRDS}/{CRD_NAME}")

    await wait_for(gone, timeout=60, message="the status CRD deleted")


@pytest.fixture
async def crd(admin_api: Api, namespace: str) -> None:
    await install_crd(admin_api, namespace)


async def pods_of(scene: Cluster, name: str, count: int = 1) -> list[dict[str, Any]]:
    """The pods of Deployment ``name``'s ReplicaSets (created, never run: there is no kubelet),
    oldest first; waits until there are ``count``."""

    async def found() -> list[dict[str, Any]] | None:
        sets = {rs["metadata"]["uid"] for rs in await scene.replica_sets(name)}
        page = await scene.api.list_page(f"/api/v1/namespaces/{scene.namespace}/pods", params=[])
        pods = [
            p
            for p in page.get("items", [])
            if any(o.get("uid") in sets for o in p["metadata"].get("ownerReferences", []))
        ]
        pods.sort(key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))
        return pods if len(pods) >= count else None

    return await wait_for(found, message=f"{count} pods of {name}")


def status_name(pod: dict[str, Any], spc: str = CLASS) -> str:
    """The driver's name for a pod's status of one class."""
    return f"{pod['metadata']['name']}-{pod['metadata']['namespace']}-{spc}"


async def report(scene: Cluster, pod: dict[str, Any], version: str, spc: str = CLASS) -> None:
    """Create the status of ``pod``'s mount, or update its version (a rotation), as the driver."""
    objects = [{"id": "secret/data/db", "version": version}]
    path = POD_STATUSES.object_path(scene.namespace, status_name(pod, spc))
    try:
        await scene.api.patch(path, {"status": {"objects": objects}}, patch_type="merge")
        return
    except ApiNotFound:
        pass
    owner = {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"]}
    body = {
        "apiVersion": f"{POD_STATUSES.group}/{POD_STATUSES.version}",
        "kind": POD_STATUSES.kind,
        "metadata": {
            "name": status_name(pod, spc),
            "ownerReferences": [{**owner, "uid": pod["metadata"]["uid"]}],
        },
        "status": {
            "podName": pod["metadata"]["name"],
            "secretProviderClassName": spc,
            "mounted": True,
            "targetPath": "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/secrets/mount",
            "objects": objects,
        },
    }
    await scene.api.create(statuses_path(scene.namespace), body)


async def forget(scene: Cluster, pod: dict[str, Any]) -> None:
    """The status of a pod that went away (the garbage collector would delete it)."""
    await scene.api.delete(POD_STATUSES.object_path(scene.namespace, status_name(pod)))


async def wait_class_recorded(scene: Cluster, name: str) -> None:
    async def recorded() -> bool:
        obj = await scene.get_deployment(name)
        record = decode_record(obj["metadata"].get("annotations", {}).get(RECORD_ANNOTATION))
        return record is not None and f"{SPC}/{CLASS}" in record.as_dict()

    await wait_for(recorded, message=f"{name}'s record names the class")


async def assert_marker_names_class(scene: Cluster, name: str) -> None:
    marker = await scene.marker("Deployment", name)
    assert marker is not None, f"{name} restarted without a marker"
    parsed = json.loads(marker)
    assert (parsed["type"], parsed["name"]) == ("SECRETPROVIDERCLASS", CLASS), marker


def mounting(name: str, annotations: dict[str, str], *, replicas: int = 1) -> dict[str, Any]:
    body = deployment(name, annotations=annotations, containers=MOUNTS, volumes=[csi_volume()])
    body["spec"]["replicas"] = replicas
    return body


@pytest.mark.cluster
@pytest.mark.usefixtures("crd")
async def test_a_rotation_restarts_once_and_the_rollout_does_not_again(
    scene: Cluster, cluster: TestCluster
) -> None:
    """1. Two pods of a Deployment (typed auto) report version 1; the controller, with only the
       shipped namespaced RBAC, records it and restarts nothing.
    2. The driver rotates them one after the other, more than a debounce apart.
    3. The new ReplicaSet's pod reports version 2; an old pod's status goes away.
    Result: exactly one new ReplicaSet, its marker naming the class. Hashing every version of the
    class would restart at each rotation, and again when the old pods go.
    """
    await scene.create_workload(mounting("web", SPC_AUTO, replicas=2))
    old = await pods_of(scene, "web", 2)
    api = await scene.as_service_account(cluster.kubeconfig)
    await scene.start_controller(
        api=api, controller_namespace=scene.namespace, enable_csi_integration=True
    )
    for pod in old:
        await report(scene, pod, "1")
    await wait_class_recorded(scene, "web")
    await scene.assert_replica_sets_stay("web", 1)

    await report(scene, old[0], "2")
    await asyncio.sleep(QUIET)  # longer than the debounce: each rotation is judged on its own
    await report(scene, old[1], "2")

    await scene.assert_replica_sets_stay("web", 2)
    await assert_marker_names_class(scene, "web")
    before = {p["metadata"]["uid"] for p in old}
    fresh = [p for p in await pods_of(scene, "web", 3) if p["metadata"]["uid"] not in before]
    for pod in fresh:
        await report(scene, pod, "2")
    await forget(scene, old[0])
    await scene.assert_replica_sets_stay("web", 2)
    assert not refused(api), f"the ServiceAccount was refused: {refused(api)}"


@pytest.mark.cluster
@pytest.mark.usefixtures("crd")
async def test_another_workloads_pods_never_restart_this_one(scene: Cluster) -> None:
    """Two Deployments mount one class; only ``web`` opts in. ``plain``'s pod (the class's newest
    status) is rotated alone: nothing restarts (neither ``plain``, not opted in, nor ``web``, whose
    pods still hold version 1; a digest of the class as a whole would have changed). Then
    ``web``'s pod is rotated: ``web`` restarts once, its marker naming the class."""
    await scene.create_workload(mounting("web", SPC_AUTO))
    await scene.create_workload(mounting("plain", {}))
    (web,) = await pods_of(scene, "web")
    (plain,) = await pods_of(scene, "plain")
    await scene.start_controller(enable_csi_integration=True)
    await report(scene, web, "1")
    await asyncio.sleep(1.1)  # creation times have whole seconds: plain's status is the newest
    await report(scene, plain, "1")
    await wait_class_recorded(scene, "web")

    async def rotate_plain() -> None:
        await report(scene, plain, "2")

    async def rotate_web() -> None:
        await report(scene, web, "2")

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=rotate_plain, right=rotate_web, source=None
    )
    await assert_marker_names_class(scene, "web")
    assert len(await scene.replica_sets("plain")) == 1


@pytest.mark.cluster
async def test_a_crd_installed_after_the_start_is_picked_up(
    scene: Cluster, admin_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller starts (and is ready) without the CRD; once it is installed, a rotation
    restarts the workload."""
    monkeypatch.setattr("reloader.watch.ABSENT_RECHECK_SECONDS", 1.0)
    await remove_crd(admin_api)
    await scene.create_workload(mounting("web", SPC_AUTO))
    (pod,) = await pods_of(scene, "web")
    controller = await scene.start_controller(enable_csi_integration=True)
    assert controller.ready() == (True, "ok")

    await install_crd(admin_api, scene.namespace)
    await report(scene, pod, "1")
    await wait_class_recorded(scene, "web")
    await report(scene, pod, "2")

    await scene.assert_replica_sets_stay("web", 2)
    await assert_marker_names_class(scene, "web")


@pytest.mark.cluster
@pytest.mark.usefixtures("crd")
async def test_without_the_flag_no_status_is_watched(scene: Cluster) -> None:
    """Without ``--enable-csi-integration`` no status informer exists and a rotation restarts
    nothing; a ConfigMap change then does (the controller was alive)."""
    await scene.create_configmap("cfg", {"a": "1"})
    containers = [{**MOUNTS[0], **env_from("ConfigMap", "cfg")}]
    body = deployment("web", annotations=AUTO, containers=containers, volumes=[csi_volume()])
    await scene.create_workload(body)
    (pod,) = await pods_of(scene, "web")
    controller = await scene.start_controller()
    assert POD_STATUSES.plural not in {i.resource.plural for i in controller.informers}
    await report(scene, pod, "1")
    await scene.wait_recorded("web")

    async def rotate() -> None:
        await report(scene, pod, "2")

    async def edit_cfg() -> None:
        await scene.patch_configmap("cfg", {"data": {"a": "2"}})

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=rotate, right=edit_cfg, source=("ConfigMap", "cfg")
    )


@pytest.mark.cluster
@pytest.mark.usefixtures("crd")
async def test_a_rotation_while_the_controller_was_down_restarts_once(scene: Cluster) -> None:
    """The controller records version 1 and stops; the pod is rotated; a new controller restarts
    the workload once. Its workers wait until every status listed at start is placed with its
    workload: deciding before would drop the class from the record, and the rotation with it."""
    await scene.create_workload(mounting("web", SPC_AUTO))
    (pod,) = await pods_of(scene, "web")
    await report(scene, pod, "1")
    await scene.start_controller(enable_csi_integration=True)
    await wait_class_recorded(scene, "web")
    await scene.stop_controllers()

    await report(scene, pod, "2")
    await scene.start_controller(enable_csi_integration=True)

    await scene.assert_replica_sets_stay("web", 2)
    await assert_marker_names_class(scene, "web")
