"""Stakater parity: every workload kind, both strategies, pause period, scoping and triggers.

Each test is one row of the parity issue, run against the real API server and controller-manager.
A restart of a kind other than a Deployment is made by the controller running as its
ServiceAccount with the namespaced overlay's RBAC as shipped, so a missing grant fails here too.
Negative checks make the wrong change alone, then prove the controller alive with one that must
restart (``Cluster.assert_not_restarted_then_restarts``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reloader.app import Controller
from reloader.digests import decode_record
from reloader.kube import Api, ApiNotFound
from reloader.model import NAMESPACES, RECORD_ANNOTATION
from tests.conftest import TestCluster
from tests.scenario import (
    Change,
    Cluster,
    container,
    deployment,
    env_from,
    exists,
    refused,
    wait_for,
    workload,
)

pytestmark = pytest.mark.cluster
AUTO = {"reloader.stakater.com/auto": "true"}
USES_CFG = [container(**env_from("ConfigMap", "cfg"))]


async def change_cfg(scene: Cluster, value: str = "2") -> None:
    await scene.patch_configmap("cfg", {"data": {"a": value}})


async def with_cfg(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})


def changing_cfg(scene: Cluster, value: str = "2") -> Change:
    async def make() -> None:
        await change_cfg(scene, value)

    return make


async def start_as_service_account(
    scene: Cluster, cluster: TestCluster, **overrides: Any
) -> tuple[Controller, Api]:
    """The controller with the shipped namespaced RBAC only (its ServiceAccount's token)."""
    api = await scene.as_service_account(cluster.kubeconfig)
    controller = await scene.start_controller(
        api=api, controller_namespace=scene.namespace, **overrides
    )
    return controller, api


# --- workload kinds ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["StatefulSet", "DaemonSet"])
async def test_pod_template_kinds_are_patched(
    scene: Cluster, cluster: TestCluster, kind: str
) -> None:
    await with_cfg(scene)
    await scene.create_workload(workload(kind, "app", annotations=AUTO, containers=USES_CFG))
    _, api = await start_as_service_account(scene, cluster)
    await scene.wait_recorded_on(kind, "app")
    assert await scene.marker(kind, "app") is None

    await change_cfg(scene)

    marker = await scene.wait_marker(kind, "app")
    assert '"name":"cfg"' in marker
    await wait_for(lambda: scene.events("Reloaded"), message="a Reloaded Event")
    assert not refused(api), f"the ServiceAccount was refused: {refused(api)}"


async def test_cronjob_change_creates_one_job_now(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(
        workload("CronJob", "nightly", annotations=AUTO, containers=USES_CFG)
    )
    await scene.start_controller()
    await scene.wait_recorded_on("CronJob", "nightly")
    assert await scene.jobs() == []

    await change_cfg(scene)

    jobs = await wait_for(scene.jobs, message="a Job created from the CronJob")
    await asyncio.sleep(1.5)
    jobs = await scene.jobs()
    assert len(jobs) == 1
    job = jobs[0]
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("CronJob", "nightly", True)
    assert job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"] == "manual"
    cronjob = await scene.get_workload("CronJob", "nightly")
    assert "jobTemplate" in cronjob["spec"]  # the CronJob itself is not restarted

    await scene.stop_controllers()
    await scene.start_controller()
    await asyncio.sleep(1.5)
    assert len(await scene.jobs()) == 1, "a controller restart must not run the job again"

    await change_cfg(scene, "3")  # the restarted controller is alive: a new change runs one more

    async def two_jobs() -> bool:
        return len(await scene.jobs()) == 2

    await wait_for(two_jobs, message="a second Job after the next change")


async def test_flapping_config_runs_a_cronjob_at_most_once_per_interval(scene: Cluster) -> None:
    """The minimum interval applies to kinds whose restart leaves no marker on the object."""
    await with_cfg(scene)
    await scene.create_workload(
        workload("CronJob", "nightly", annotations=AUTO, containers=USES_CFG)
    )
    await scene.start_controller(debounce_seconds=0.05, min_restart_interval_seconds=30)
    await scene.wait_recorded_on("CronJob", "nightly")

    for value in range(2, 12):
        await change_cfg(scene, str(value))
        await asyncio.sleep(0.1)

    await wait_for(scene.jobs, message="the first Job")
    await asyncio.sleep(2)
    assert len(await scene.jobs()) == 1


async def test_job_is_replaced_once(scene: Cluster, cluster: TestCluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(workload("Job", "migrate", annotations=AUTO, containers=USES_CFG))
    _, api = await start_as_service_account(scene, cluster)
    first = await scene.wait_recorded_on("Job", "migrate")

    await change_cfg(scene)

    async def replaced() -> dict[str, Any] | None:
        try:
            job = await scene.get_workload("Job", "migrate")
        except ApiNotFound:
            return None
        return job if job["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = await wait_for(replaced, message="the Job recreated")
    await asyncio.sleep(1.5)
    third = await scene.get_workload("Job", "migrate")
    assert third["metadata"]["uid"] == second["metadata"]["uid"], "replaced more than once"
    record = decode_record(third["metadata"]["annotations"][RECORD_ANNOTATION])
    assert record is not None
    assert record != decode_record(first["metadata"]["annotations"][RECORD_ANNOTATION])
    assert not refused(api), f"the ServiceAccount was refused: {refused(api)}"


ROLLOUT_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "rollouts.argoproj.io"},
    "spec": {
        "group": "argoproj.io",
        "scope": "Namespaced",
        "names": {"kind": "Rollout", "plural": "rollouts", "singular": "rollout"},
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


async def test_argo_rollouts_absent_crd_then_installed(
    scene: Cluster, cluster: TestCluster, monkeypatch: Any
) -> None:
    """With --is-Argo-Rollouts and no CRD the controller is ready; once the CRD is installed,
    Rollouts are patched: the template by default, ``spec.restartAt`` with rollout-strategy
    restart. The controller runs as its ServiceAccount."""
    monkeypatch.setattr("reloader.watch.ABSENT_RECHECK_SECONDS", 1.0)
    api = scene.api
    if await exists(api, f"{CRDS}/rollouts.argoproj.io"):
        pytest.skip("a Rollout CRD is already installed on this cluster")
    await with_cfg(scene)
    # Ready although the CRD is absent.
    _, sa_api = await start_as_service_account(scene, cluster, is_argo_rollouts=True)

    await api.create(CRDS, ROLLOUT_CRD)
    try:
        await wait_for(
            lambda: exists(
                api, f"/apis/argoproj.io/v1alpha1/namespaces/{scene.namespace}/rollouts"
            ),
            message="the CRD served",
        )
        restart = {**AUTO, "reloader.stakater.com/rollout-strategy": "restart"}
        await scene.create_workload(
            workload("Rollout", "canary", annotations=AUTO, containers=USES_CFG)
        )
        await scene.create_workload(
            workload("Rollout", "bounce", annotations=restart, containers=USES_CFG)
        )
        await scene.wait_recorded_on("Rollout", "canary")
        await scene.wait_recorded_on("Rollout", "bounce")

        await change_cfg(scene)

        assert '"name":"cfg"' in await scene.wait_marker("Rollout", "canary")

        async def restart_at() -> str | None:
            rollout = await scene.get_workload("Rollout", "bounce")
            at: str | None = rollout["spec"].get("restartAt")
            return at

        assert await wait_for(restart_at, message="spec.restartAt on the restart-strategy Rollout")
        assert await scene.marker("Rollout", "bounce") is None
        assert not refused(sa_api), f"the ServiceAccount was refused: {refused(sa_api)}"
    finally:
        await scene.stop_controllers()
        await api.delete(f"{CRDS}/rollouts.argoproj.io")


async def test_ignored_workload_types(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(
        workload("CronJob", "nightly", annotations=AUTO, containers=USES_CFG)
    )
    await scene.create_workload(deployment("web", annotations=AUTO, containers=USES_CFG))
    await scene.start_controller(ignored_workload_types=["cronjobs"])
    await scene.wait_recorded("web")

    await change_cfg(scene)

    await scene.assert_replica_sets_stay("web", 2)
    assert await scene.jobs() == []


# --- strategies -------------------------------------------------------------------------------


async def test_env_vars_strategy_sets_stakater_variable(scene: Cluster) -> None:
    await scene.create_configmap("app-config", {"a": "1"})
    containers = [container(**env_from("ConfigMap", "app-config")), container("sidecar")]
    await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
    await scene.start_controller(reload_strategy="env-vars")
    await scene.wait_recorded("web")

    await scene.patch_configmap("app-config", {"data": {"a": "2"}})

    await scene.assert_replica_sets_stay("web", 2)
    obj = await scene.get_deployment("web")
    for spec in obj["spec"]["template"]["spec"]["containers"]:
        names = {e["name"]: e.get("value") for e in spec.get("env", [])}
        assert names.get("STAKATER_APP_CONFIG_CONFIGMAP"), spec["name"]
    assert await scene.marker("Deployment", "web") is None


async def test_switching_strategy_restarts_nothing(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(deployment("web", annotations=AUTO, containers=USES_CFG))
    await scene.start_controller(reload_strategy="annotations")
    recorded = (await scene.wait_recorded("web"))["metadata"]["annotations"][RECORD_ANNOTATION]

    async def switch() -> None:
        await scene.stop_controllers()
        await scene.start_controller(reload_strategy="env-vars")

    async def then_change() -> None:
        obj = await scene.get_deployment("web")
        assert obj["metadata"]["annotations"][RECORD_ANNOTATION] == recorded, "re-recorded"
        await change_cfg(scene)

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=switch, right=then_change, source=None
    )
    (spec,) = (await scene.pod_template("Deployment", "web"))["spec"]["containers"]
    assert "STAKATER_CFG_CONFIGMAP" in {e["name"] for e in spec.get("env", [])}


async def test_pause_period_pauses_then_resumes_across_a_controller_restart(
    scene: Cluster,
) -> None:
    await with_cfg(scene)
    annotations = {**AUTO, "deployment.reloader.stakater.com/pause-period": "4s"}
    await scene.create_workload(deployment("web", annotations=annotations, containers=USES_CFG))
    await scene.start_controller()
    await scene.wait_recorded("web")

    await change_cfg(scene)

    async def paused() -> dict[str, Any] | None:
        obj = await scene.get_deployment("web")
        return obj if obj["spec"].get("paused") else None

    obj = await wait_for(paused, message="the Deployment paused")
    assert "deployment.reloader.stakater.com/paused-at" in obj["metadata"]["annotations"]
    await scene.stop_controllers()  # the pause state lives on the object, not in this process
    assert len(await scene.replica_sets("web")) == 1, "rolled out while paused"
    await asyncio.sleep(4)

    await scene.start_controller()

    async def resumed() -> dict[str, Any] | None:
        obj = await scene.get_deployment("web")
        return None if obj["spec"].get("paused") else obj

    obj = await wait_for(resumed, message="the Deployment resumed after the period")
    assert "deployment.reloader.stakater.com/paused-at" not in obj["metadata"]["annotations"]
    await scene.assert_replica_sets_stay("web", 2)


# --- scoping and triggers ---------------------------------------------------------------------


async def test_namespace_selector_follows_namespace_labels(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(deployment("web", annotations=AUTO, containers=USES_CFG))
    label = {"reloader-test": scene.namespace}
    await scene.start_controller(
        namespaces=[], namespace_selector=[f"reloader-test:{scene.namespace}"]
    )

    async def select_then_change() -> None:
        path = f"{NAMESPACES.collection_path(None)}/{scene.namespace}"
        await scene.api.patch(path, {"metadata": {"labels": label}}, patch_type="merge")
        await scene.wait_recorded("web")  # selected now: first sight, recorded
        await change_cfg(scene, "selected")

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing_cfg(scene, "unselected"),
        right=select_then_change,
        source=("ConfigMap", "cfg"),
    )


async def test_resource_label_selector_hides_unlabelled_configs(scene: Cluster) -> None:
    await scene.create_configmap("plain", {"a": "1"})
    await scene.create_configmap("labelled", {"a": "1"}, labels={"reload": "yes"})
    env = [{"configMapRef": {"name": "plain"}}, {"configMapRef": {"name": "labelled"}}]
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(envFrom=env)])
    )
    await scene.start_controller(resource_label_selector=["reload:yes"])
    await scene.wait_recorded("web")

    async def change_plain() -> None:
        await scene.patch_configmap("plain", {"data": {"a": "2"}})

    async def change_labelled() -> None:
        await scene.patch_configmap("labelled", {"data": {"a": "2"}})

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=change_plain, right=change_labelled, source=("ConfigMap", "labelled")
    )


async def test_resources_to_ignore_secrets(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_secret("sec", {"a": "1"})
    env = [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}}]
    await scene.create_workload(
        deployment("web", annotations=AUTO, containers=[container(envFrom=env)])
    )
    await scene.start_controller(resources_to_ignore=["secrets"])
    await scene.wait_recorded("web")

    async def change_secret() -> None:
        await scene.set_secret("sec", {"a": "2"})

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=change_secret, right=changing_cfg(scene), source=("ConfigMap", "cfg")
    )


async def test_reload_on_create(scene: Cluster) -> None:
    ref = {"envFrom": [{"configMapRef": {"name": "late", "optional": True}}]}
    await scene.create_configmap("cfg", {"a": "1"})
    ref["envFrom"].append({"configMapRef": {"name": "cfg"}})
    await scene.create_workload(deployment("web", annotations=AUTO, containers=[container(**ref)]))
    await scene.start_controller(reload_on_create=True)
    await scene.wait_recorded("web")

    await scene.create_configmap("late", {"a": "1"})

    await scene.assert_replica_sets_stay("web", 2)


async def test_reload_on_create_is_not_a_mass_restart_at_start(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(deployment("web", annotations=AUTO, containers=USES_CFG))
    await scene.start_controller(reload_on_create=True, reload_on_delete=True)
    await scene.wait_recorded("web")

    async def restart_controller() -> None:
        await scene.stop_controllers()
        await scene.start_controller(reload_on_create=True, reload_on_delete=True)

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=restart_controller, right=changing_cfg(scene), source=("ConfigMap", "cfg")
    )


async def test_auto_reload_all(scene: Cluster) -> None:
    await with_cfg(scene)
    await scene.create_workload(deployment("plain", containers=USES_CFG))
    opt_out = {"reloader.stakater.com/auto": "false"}
    await scene.create_workload(deployment("optout", annotations=opt_out, containers=USES_CFG))
    await scene.start_controller(auto_reload_all=True)
    await scene.wait_recorded("plain")

    # The same change must restart "plain": that is what shows the controller alive here.
    await scene.assert_not_restarted("optout", changing_cfg(scene))
    await scene.assert_replica_sets_stay("plain", 2)
    assert await scene.marker("Deployment", "plain") is not None
