"""The workers' writes: failures, budgets and bookkeeping.

Permanent failures are counted, logged and reported once; transient ones are retried through the
queue. The permanent failures are real ones: a ValidatingAdmissionPolicy on the real API server
refuses any Deployment update that sets the restart marker (recording digests still passes), and a
ServiceAccount whose Role lacks ``patch`` on Deployments gets the server's own 403. A transient
failure (503) comes from the loopback fault proxy (``tests/faultproxy.py``) between the controller
and the real server: a real HTTP answer on a real connection. A 409 and a refused connection are
real.

The budgets (global restart rate, record writes) are checked with many workloads: each deferred
workload waits once for its own turn, and first-sight records are spread out in time as the server
sees them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from reloader.app import Controller
from reloader.decide import Decision
from reloader.digests import DigestKey
from reloader.kube import Api, ApiConflict, ApiUnavailable, connect_with_dict
from reloader.metrics import Metrics
from reloader.model import CONFIGMAPS, KINDS, LAST_RELOADED_FROM, RECORD_ANNOTATION, WorkloadKey
from reloader.permissions import Permission
from reloader.queue import TokenBucket, WorkQueue
from reloader.restart import (
    CONFLICTS_BEFORE_WARNING,
    Restarter,
    RestartFailed,
    RestartPolicy,
    _failed,
)
from reloader.settings import Settings
from tests.conftest import TestCluster
from tests.faultproxy import Fault, FaultProxy
from tests.scenario import (
    QUIET,
    TEST_KEY,
    Cluster,
    container,
    deployment,
    env_from,
    refusal_policy,
    wait_for,
)
from tests.test_manifests import service_account_api, wait_allowed

ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def freeze_policy(namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    expression = (
        "!has(object.spec.template.metadata.annotations) || "
        "!('reloader.stakater.com/last-reloaded-from' in object.spec.template.metadata.annotations)"
    )
    return refusal_policy(
        f"freeze-restarts-{namespace}",
        namespace,
        group="apps",
        resource="deployments",
        operation="UPDATE",
        expression=expression,
        message="restarts are frozen here",
    )


@pytest.mark.cluster
async def test_a_restart_refused_for_good_is_counted_reported_and_not_retried(
    scene: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    policy, binding = freeze_policy(scene.namespace)
    await scene.api.create(f"{ADMISSION}/validatingadmissionpolicies", policy)
    await scene.api.create(f"{ADMISSION}/validatingadmissionpolicybindings", binding)
    try:
        await asyncio.sleep(2)  # the apiserver loads new policies asynchronously
        await scene.create_configmap("cfg", {"a": "1"})
        annotations = {"reloader.stakater.com/auto": "true"}
        containers = [container(**env_from("ConfigMap", "cfg"))]
        await scene.create_workload(
            deployment("web", annotations=annotations, containers=containers)
        )
        controller = await scene.start_controller()
        await scene.wait_recorded("web")  # recording is not a restart: allowed

        with caplog.at_level(logging.ERROR, logger="reloader"):
            await scene.patch_configmap("cfg", {"data": {"a": "2"}})
            events = await wait_for(lambda: scene.events("ReloadFail"), message="ReloadFail Event")

        assert events[0]["type"] == "Warning"
        assert "restarts are frozen here" in events[0]["message"]
        assert any(r.getMessage() == "write failed for good" for r in caplog.records)
        registry = controller.metrics.registry
        failed = registry.get_sample_value("reloader_reload_executed_total", {"success": "false"})
        assert failed == 1.0
        await asyncio.sleep(1.5)
        # A 409 from a stale read may be retried before; the refusal itself is never retried.
        again = registry.get_sample_value("reloader_reload_executed_total", {"success": "false"})
        assert again == 1.0, "the refused restart was attempted again"
        await scene.assert_replica_sets_stay("web", 1, quiet=0)
    finally:
        name = policy["metadata"]["name"]
        await scene.api.delete(f"{ADMISSION}/validatingadmissionpolicybindings/{name}")
        await scene.api.delete(f"{ADMISSION}/validatingadmissionpolicies/{name}")


@pytest.mark.cluster
async def test_transient_failures_are_retried_with_backoff_until_success(
    cluster: TestCluster, scene: Cluster
) -> None:
    """The fault proxy between the controller and the real API server answers the restart patch
    with 503 twice (a real HTTP answer on a real connection); the third reaches the server.
    The restart is retried through the queue, lands once, and success forgets the failures."""
    await scene.create_configmap("cfg", {"a": "1"})
    containers = [container(**env_from("ConfigMap", "cfg"))]
    await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
    async with FaultProxy(cluster.kubeconfig) as proxy:
        controller = await scene.start_controller(api=proxy.api())
        await scene.wait_recorded("web")
        retries = controller.metrics.registry.get_sample_value("reloader_retries_total") or 0
        patches = frozenset({"PATCH"})
        proxy.add_fault(Fault(status=503, times=2, methods=patches, path_contains="/web"))
        await scene.patch_configmap("cfg", {"data": {"a": "2"}})
        await scene.assert_replica_sets_stay("web", 2)

        answers = [a.status for a in proxy.log if a.method == "PATCH" and "/web" in a.path]
        assert answers[-3:] == [503, 503, 200]
        after = controller.metrics.registry.get_sample_value("reloader_retries_total")
        assert after == retries + 2
        key = WorkloadKey("Deployment", scene.namespace, "web")
        assert controller.queue.num_requeues(key) == 0, "success forgets the failure count"
        await scene.stop_controllers()  # while the proxy still answers


# --- budgets: each deferred workload waits once, for its own turn ---------------------------------

AUTO = {"reloader.stakater.com/auto": "true"}


async def create_many(scene: Cluster, count: int) -> list[str]:
    """``count`` auto Deployments (no replicas: only their ReplicaSets matter) on ConfigMap cfg."""
    names = [f"web-{i}" for i in range(count)]
    containers = [container(**env_from("ConfigMap", "cfg"))]
    for start in range(0, count, 20):
        bodies = [deployment(name, annotations=AUTO, containers=containers) for name in names]
        for body in bodies[start : start + 20]:
            body["spec"]["replicas"] = 0
        await asyncio.gather(*(scene.create_workload(b) for b in bodies[start : start + 20]))
    return names


async def deployments(scene: Cluster) -> list[dict[str, Any]]:
    path = KINDS["Deployment"].resource.collection_path(scene.namespace)
    return list((await scene.api.list_page(path, params=[])).get("items", []))


def recorded(obj: Mapping[str, Any]) -> bool:
    return RECORD_ANNOTATION in (obj["metadata"].get("annotations") or {})


def restarted_at(obj: Mapping[str, Any]) -> float | None:
    """``observedAt`` of the restart marker on the pod template (None: never restarted)."""
    marker = (obj["spec"]["template"]["metadata"].get("annotations") or {}).get(LAST_RELOADED_FROM)
    return float(json.loads(marker)["observedAt"]) if marker else None


async def wait_all(
    scene: Cluster, check: Callable[[Mapping[str, Any]], object], count: int
) -> None:
    async def all_done() -> bool:
        found = await deployments(scene)
        return len(found) == count and all(check(obj) for obj in found)

    await wait_for(all_done, timeout=120, message=f"all {count} deployments")


@pytest.mark.cluster
async def test_deferred_restarts_each_wait_once_for_their_own_turn(scene: Cluster) -> None:
    """200 workloads on one ConfigMap, 40 restarts a second: all restart once, the rate holds, and
    each deferred workload is synced about once while it waits. Deferring with "ask the bucket,
    come back after a fixed wait" brought them all back together each time a token came: about
    n²/2 = 20,000 deferrals here (and 2 million for 2,000 workloads)."""
    count = 200
    await scene.create_configmap("cfg", {"a": "1"})
    await create_many(scene, count)
    controller = await scene.start_controller(restart_rate_per_second=40.0, restart_burst=1)
    await wait_all(scene, recorded, count)
    registry = controller.metrics.registry
    before = registry.get_sample_value("reloader_restarts_deferred_total") or 0.0

    await scene.patch_configmap("cfg", {"data": {"a": "2"}})
    await wait_all(scene, restarted_at, count)

    deferred = (registry.get_sample_value("reloader_restarts_deferred_total") or 0.0) - before
    assert count - 1 <= deferred <= 2 * count, f"{deferred} deferrals for {count} workloads"
    times = [restarted_at(obj) or 0.0 for obj in await deployments(scene)]
    assert max(times) - min(times) >= 3, "200 restarts at 40/s span about 5 s"
    await asyncio.sleep(1.0)  # no second round
    assert registry.get_sample_value("reloader_reload_executed_total", {"success": "true"}) == count


def with_record_budget(controller: Controller, budget: TokenBucket) -> Restarter:
    """The controller's restarter rebuilt with ``budget`` for record writes (it is no setting yet);
    to be called before the controller runs."""
    restarter = Restarter(
        api=controller.api,
        workloads=controller.workloads,
        configs=controller.configs,
        digest_key=controller.digest_key,
        policy=RestartPolicy(reload_on_create=False, reload_on_delete=False, min_interval=0),
        restart_budget=TokenBucket(rate=0, burst=0),
        record_budget=budget,
        metrics=controller.metrics,
        changed_since=lambda key: None,
    )
    controller.restarter = restarter
    return restarter


@pytest.mark.cluster
async def test_first_sight_records_are_spread_out_by_their_budget(scene: Cluster) -> None:
    """A controller starting on many workloads records them all, but not all at once: 40 records
    with a burst of 5 at 10 a second take at least 3.5 s as the server sees them. (Without a record
    budget, four workers write all 40 in well under a second.)"""
    count = 40
    await scene.create_configmap("cfg", {"a": "1"})
    await create_many(scene, count)
    settings = Settings(namespaces=[scene.namespace], debounce_seconds=0.2)
    controller = Controller(
        settings=settings, api=scene.api, digest_key=DigestKey.from_secret(TEST_KEY)
    )
    with_record_budget(controller, TokenBucket(rate=10.0, burst=5))
    stop = asyncio.Event()
    scene.controllers.append((controller, stop, asyncio.create_task(controller.run(stop))))

    async def some_recorded() -> bool:
        return any(recorded(obj) for obj in await deployments(scene))

    await wait_for(some_recorded, message="a first record")
    first = time.monotonic()
    await wait_all(scene, recorded, count)
    assert time.monotonic() - first >= 3.0, "records were not held to 10 a second"


# --- a write RBAC forbids: reported once, tried again on the next change --------------------------

RBAC = "/apis/rbac.authorization.k8s.io/v1"


def role_rules(*, patch_deployments: bool) -> list[dict[str, Any]]:
    """Everything the controller needs in one namespace, with or without patching Deployments."""
    read = ["list", "watch"]
    apps_verbs = [*read, "patch"] if patch_deployments else read
    return [
        {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": read},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": apps_verbs},
        {"apiGroups": ["apps"], "resources": ["statefulsets", "daemonsets"], "verbs": read},
        {"apiGroups": ["batch"], "resources": ["cronjobs", "jobs"], "verbs": read},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]


async def limited_service_account(cluster: TestCluster, scene: Cluster) -> Api:
    """An Api as ServiceAccount ``limited`` of the test namespace, whose Role cannot patch."""
    namespace = scene.namespace
    await scene.api.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "limited"}}
    )
    role = {"metadata": {"name": "limited"}, "rules": role_rules(patch_deployments=False)}
    binding = {
        "metadata": {"name": "limited"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "limited"},
        "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": namespace}],
    }
    await scene.api.create(f"{RBAC}/namespaces/{namespace}/roles", role)
    await scene.api.create(f"{RBAC}/namespaces/{namespace}/rolebindings", binding)
    api = await service_account_api(
        scene.api, cluster.kubeconfig, namespace=namespace, name="limited"
    )
    await wait_allowed(api, [Permission("apps", "deployments", "watch")], namespace=namespace)
    return api


def patches_forbidden(api: Api) -> int:
    return api.statistics().requests.get(("PATCH", "403"), 0)


@pytest.mark.cluster
async def test_a_write_rbac_forbids_is_reported_once_and_tried_again_on_the_next_change(
    cluster: TestCluster, scene: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a 403 on the restart patch was retried with backoff forever, with no Event and no
    failed-reload count. Now: one PATCH, one ReloadFail Warning naming the missing grant, the
    failure counted; nothing more while nothing changes; and once the grant is there, the next
    config change restarts."""
    await scene.create_configmap("cfg", {"a": "1"})
    containers = [container(**env_from("ConfigMap", "cfg"))]
    await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
    await scene.start_controller()  # an admin controller records first sight, then goes
    await scene.wait_recorded("web")
    await scene.stop_controllers()
    api = await limited_service_account(cluster, scene)
    try:
        settings = Settings(
            namespaces=[scene.namespace], debounce_seconds=0.2, min_restart_interval_seconds=0
        )
        controller = Controller(
            settings=settings, api=api, digest_key=DigestKey.from_secret(TEST_KEY)
        )
        stop = asyncio.Event()
        scene.controllers.append((controller, stop, asyncio.create_task(controller.run(stop))))
        await asyncio.wait_for(controller.wait_synced(), timeout=30)

        with caplog.at_level(logging.ERROR, logger="reloader"):
            await scene.patch_configmap("cfg", {"data": {"a": "2"}})
            await wait_for(lambda: scene.events("ReloadFail"), message="ReloadFail Event")
            await asyncio.sleep(QUIET)  # a retry storm would show here

        events = await scene.events("ReloadFail")
        assert len(events) == 1, f"{len(events)} ReloadFail Events"
        assert events[0]["type"] == "Warning"
        assert "patch deployments.apps" in events[0]["message"]
        assert patches_forbidden(api) == 1, "the forbidden patch was retried"
        failed = controller.metrics.registry.get_sample_value(
            "reloader_reload_executed_total", {"success": "false"}
        )
        assert failed == 1.0
        logged = [r for r in caplog.records if r.getMessage() == "write failed for good"]
        assert [getattr(r, "missing_permission", None) for r in logged] == [
            "patch deployments.apps"
        ]
        await scene.assert_replica_sets_stay("web", 1, quiet=0)

        role = {"rules": role_rules(patch_deployments=True)}
        await scene.api.patch(
            f"{RBAC}/namespaces/{scene.namespace}/roles/limited", role, patch_type="merge"
        )
        patch = Permission("apps", "deployments", "patch")
        await wait_allowed(api, [patch], namespace=scene.namespace)
        await scene.patch_configmap("cfg", {"data": {"a": "3"}})

        await scene.assert_replica_sets_stay("web", 2)
        assert "cfg" in (await scene.marker("Deployment", "web") or "")
        assert patches_forbidden(api) == 1
    finally:
        await scene.stop_controllers()
        await api.close()


# --- conflicts and unreachable servers: retried, logged by how surprising they are ----------------


async def real_conflict(scene: Cluster) -> ApiConflict:
    """The server's own 409: a patch carrying a resourceVersion that is no longer current."""
    await scene.create_configmap("cfg", {"a": "1"})
    path = CONFIGMAPS.object_path(scene.namespace, "cfg")
    stale = (await scene.api.get(path))["metadata"]["resourceVersion"]
    await scene.patch_configmap("cfg", {"data": {"a": "2"}})
    try:
        stale_patch = {"metadata": {"resourceVersion": stale}, "data": {"a": "3"}}
        await scene.api.patch(path, stale_patch, patch_type="merge")
    except ApiConflict as conflict:
        return conflict
    raise AssertionError("the server accepted a stale resourceVersion")


async def real_unavailable() -> ApiUnavailable:
    """A refused connection: nothing listens on port 1."""
    api = await connect_with_dict(kubeconfig_dict("https://127.0.0.1:1"))
    try:
        await api.get("/version")
    except ApiUnavailable as error:
        return error
    finally:
        await api.close()
    raise AssertionError("something answered on port 1")


def kubeconfig_dict(server: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "x",
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
        "clusters": [{"name": "x", "cluster": {"server": server}}],
        "users": [{"name": "x", "user": {"token": "x"}}],
    }


@pytest.mark.cluster
async def test_an_expected_conflict_is_retried_quietly_and_other_failures_loudly(
    scene: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A 409 is how the controller learns its cache was one write behind (first sight meets the
    Deployment controller's own update all the time): retried, logged at debug, until it keeps
    happening. A server that cannot be reached is retried and logged as a warning."""
    queue: WorkQueue[WorkloadKey] = WorkQueue()
    metrics = Metrics()
    record = Decision("record", None, (), "first sight")
    quiet, loud = WorkloadKey("Deployment", "ns", "a"), WorkloadKey("Deployment", "ns", "b")
    conflict, unavailable = await real_conflict(scene), await real_unavailable()
    try:
        with caplog.at_level(logging.DEBUG, logger="reloader"):
            for _ in range(CONFLICTS_BEFORE_WARNING + 1):
                failure = RestartFailed(quiet, record, conflict)
                await _failed(queue, None, failure, metrics)  # type: ignore[arg-type]
            await _failed(queue, None, RestartFailed(loud, record, unavailable), metrics)  # type: ignore[arg-type]
        levels = [
            (getattr(r, "workload", ""), r.levelname)
            for r in caplog.records
            if r.getMessage() == "write failed; will retry"
        ]
        expected = [("Deployment/a", "DEBUG")] * CONFLICTS_BEFORE_WARNING
        assert levels == [*expected, ("Deployment/a", "WARNING"), ("Deployment/b", "WARNING")]
        assert queue.num_requeues(quiet) == CONFLICTS_BEFORE_WARNING + 1, "every 409 is retried"
        assert queue.num_requeues(loud) == 1
    finally:
        await queue.shutdown()


# --- bookkeeping leaves with the workload --------------------------------------------------------


@pytest.mark.cluster
async def test_a_deleted_workload_leaves_no_state_behind(scene: Cluster) -> None:
    """A workload reported once for an invalid annotation, then deleted, is never synced again
    (the index queues no deleted workload): its entry used to stay for the life of the process."""
    annotations = {"reloader.stakater.com/auto": "yes please"}
    await scene.create_workload(deployment("web", annotations=annotations))
    controller = await scene.start_controller()
    await wait_for(lambda: scene.events("InvalidAnnotation"), message="a Warning Event")
    assert controller.restarter.tracked() == 1

    await scene.api.delete(KINDS["Deployment"].resource.object_path(scene.namespace, "web"))

    async def forgotten() -> bool:
        return controller.restarter.tracked() == 0

    await wait_for(forgotten, timeout=10, message="the deleted workload forgotten")
