"""CronJob and Job restarts that are never skipped, doubled or lost, and the digest-key bootstrap.

All against the real API server. Refusals come from a real ValidatingAdmissionPolicy; the one
fault a real server cannot produce on demand (a DELETE carried out whose answer never arrives) is
made by a client that drops that one answer after the server has acted on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client, config

from reloader.app import Controller, StartupError, load_digest_key
from reloader.digests import DigestKey
from reloader.kube import Api, ApiError, ApiNotFound, ApiUnavailable
from reloader.model import CONFIGMAPS, RECORD_ANNOTATION
from reloader.patches import PENDING_JOB_LABEL, RECREATED_FROM_ANNOTATION
from reloader.settings import Settings
from tests.conftest import TestCluster
from tests.scenario import (
    QUIET,
    TEST_KEY,
    Cluster,
    container,
    env_from,
    refusal_policy,
    wait_for,
    workload,
)
from tests.test_manifests import service_account_api

pytestmark = pytest.mark.cluster
AUTO = {"reloader.stakater.com/auto": "true"}
USES_CFG = [container(**env_from("ConfigMap", "cfg"))]
ADMISSION = "/apis/admissionregistration.k8s.io/v1"


async def change_cfg(scene: Cluster, value: str) -> None:
    await scene.patch_configmap("cfg", {"data": {"a": value}})


async def start(scene: Cluster, **overrides: Any) -> Controller:
    """The scene's controller, keeping its pending Jobs in the test's own namespace."""
    return await scene.start_controller(controller_namespace=scene.namespace, **overrides)


def record_of(obj: dict[str, Any]) -> str | None:
    value = obj["metadata"].get("annotations", {}).get(RECORD_ANNOTATION)
    return str(value) if value is not None else None


async def wait_record_changes(scene: Cluster, kind: str, name: str, *, from_: str | None) -> str:
    async def changed() -> str | None:
        record = record_of(await scene.get_workload(kind, name))
        return record if record and record != from_ else None

    return await wait_for(changed, message=f"a new record on {kind} {name}")


async def wait_jobs(scene: Cluster, count: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        jobs = await scene.jobs()
        return jobs if len(jobs) >= count else None

    return await wait_for(enough, message=f"{count} Jobs")


# --- a real admission refusal --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def refusing(
    scene: Cluster,
    *,
    resource: str,
    operation: str,
    expression: str,
    refused: Callable[[], Awaitable[bool]],
) -> AsyncIterator[None]:
    """A ValidatingAdmissionPolicy in the test's namespace refusing ``operation`` on ``resource``
    (batch/v1) unless ``expression`` holds; in force from entry (``refused`` probes it) until
    exit, which waits until the server no longer applies it."""
    name = f"refuse-{scene.namespace}"
    policy, binding = refusal_policy(
        name,
        scene.namespace,
        group="batch",
        resource=resource,
        operation=operation,
        expression=expression,
        message="refused by the test",
    )
    await scene.api.create(f"{ADMISSION}/validatingadmissionpolicies", policy)
    await scene.api.create(f"{ADMISSION}/validatingadmissionpolicybindings", binding)
    try:
        await wait_for(refused, message="the admission policy in force")
        yield
    finally:
        await scene.api.delete(f"{ADMISSION}/validatingadmissionpolicybindings/{name}")
        await scene.api.delete(f"{ADMISSION}/validatingadmissionpolicies/{name}")

    async def lifted() -> bool:
        return not await refused()

    await wait_for(lifted, message="the admission policy lifted")


# --- CronJob: one Job per restart ----------------------------------------------------------------


async def test_a_config_that_comes_back_runs_the_cronjob_each_time(scene: Cluster) -> None:
    """
    1. An auto CronJob reads ConfigMap cfg (a=1); the controller records it.
    2. cfg goes 1→2→1→2, each change once the previous restart is recorded.
    Result: three Jobs with three names; before, the third was named like the first (from the
    digests alone), got 409 and was skipped as "already exists".
    """
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        workload("CronJob", "nightly", annotations=AUTO, containers=USES_CFG)
    )
    await start(scene)
    record = record_of(await scene.wait_recorded_on("CronJob", "nightly"))

    for count, value in enumerate(("2", "1", "2"), start=1):
        await change_cfg(scene, value)
        await wait_jobs(scene, count)
        record = await wait_record_changes(scene, "CronJob", "nightly", from_=record)

    await asyncio.sleep(QUIET)
    names = {job["metadata"]["name"] for job in await scene.jobs()}
    assert len(names) == 3, names


async def test_a_retried_cronjob_restart_runs_no_second_job(scene: Cluster) -> None:
    """
    1. An auto CronJob reads cfg; recorded. A policy then refuses any change of its record.
    2. cfg changes: the controller creates the Job, and the record patch is refused for good.
    3. That controller stops; the policy goes; a new controller starts and sees the same change.
    Result: it records without a second Job (same name, 409). Then a new change → a second Job,
    so the controller was alive and not merely quiet. (This guards the name against depending on
    anything a retry changes, such as the restart time.)
    """
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        workload("CronJob", "nightly", annotations=AUTO, containers=USES_CFG)
    )
    probe = workload("CronJob", "probe", containers=USES_CFG)
    probe["metadata"]["annotations"] = {RECORD_ANNOTATION: "probe"}
    await scene.create_workload(probe)
    await start(scene)
    first = record_of(await scene.wait_recorded_on("CronJob", "nightly"))

    async def record_change_refused() -> bool:
        patch = {"metadata": {"annotations": {RECORD_ANNOTATION: secrets.token_hex(4)}}}
        try:
            await scene.api.patch(scene_path(scene, "probe"), patch, patch_type="merge")
        except ApiError as error:
            return "refused by the test" in error.message
        return False

    same_record = (
        f"!has(oldObject.metadata.annotations) || !has(object.metadata.annotations) || "
        f"!('{RECORD_ANNOTATION}' in oldObject.metadata.annotations) || "
        f"('{RECORD_ANNOTATION}' in object.metadata.annotations && "
        f"object.metadata.annotations['{RECORD_ANNOTATION}'] == "
        f"oldObject.metadata.annotations['{RECORD_ANNOTATION}'])"
    )
    async with refusing(
        scene,
        resource="cronjobs",
        operation="UPDATE",
        expression=same_record,
        refused=record_change_refused,
    ):
        await change_cfg(scene, "2")
        await wait_jobs(scene, 1)
        await wait_for(lambda: scene.events("ReloadFail"), message="the record patch refused")
        await scene.stop_controllers()
    assert record_of(await scene.get_workload("CronJob", "nightly")) == first

    await start(scene)
    await wait_record_changes(scene, "CronJob", "nightly", from_=first)
    await asyncio.sleep(QUIET)
    assert len(await scene.jobs()) == 1, "the retried restart ran the CronJob a second time"

    await change_cfg(scene, "3")
    await wait_jobs(scene, 2)


def scene_path(scene: Cluster, cronjob: str) -> str:
    return f"/apis/batch/v1/namespaces/{scene.namespace}/cronjobs/{cronjob}"


# --- Job: deleted for re-creation, never lost ----------------------------------------------------


async def pending_copies(scene: Cluster) -> list[dict[str, Any]]:
    params = [("labelSelector", PENDING_JOB_LABEL)]
    page = await scene.api.list_page(CONFIGMAPS.collection_path(scene.namespace), params=params)
    return list(page.get("items", []))


async def job_or_none(scene: Cluster, name: str) -> dict[str, Any] | None:
    try:
        return await scene.get_workload("Job", name)
    except ApiNotFound:
        return None


async def wait_replaced(scene: Cluster, name: str, *, old_uid: str) -> dict[str, Any]:
    async def replaced() -> dict[str, Any] | None:
        job = await job_or_none(scene, name)
        return job if job is not None and job["metadata"]["uid"] != old_uid else None

    return await wait_for(replaced, message=f"Job {name} created again")


async def assert_replaced_once(scene: Cluster, job: dict[str, Any], *, old_uid: str) -> None:
    """``job`` is ours (it names the Job it replaces), stays, and no copy is left behind."""
    assert job["metadata"]["annotations"][RECREATED_FROM_ANNOTATION] == old_uid
    await wait_for(
        lambda: _none_left(scene), timeout=10, message="the pending copy removed after the create"
    )
    await asyncio.sleep(QUIET)
    now = await scene.get_workload("Job", job["metadata"]["name"])
    assert now["metadata"]["uid"] == job["metadata"]["uid"], "the Job was created more than once"


async def _none_left(scene: Cluster) -> bool:
    return not await pending_copies(scene)


async def test_a_job_deleted_and_not_created_is_created_by_the_next_controller(
    scene: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """
    1. An auto Job reads cfg; recorded. A policy then refuses to create Jobs carrying a record.
    2. cfg changes: the controller keeps a copy, deletes the Job, and its create is refused.
    3. That controller stops (as a process dying between delete and create would); the policy
       goes; a new controller starts.
    Result: the new controller creates the Job, once, and removes the copy; before, the body
    lived only in the first controller's memory and the Job was lost. Then a new change replaces
    it again: the controller was alive.
    """
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(workload("Job", "migrate", annotations=AUTO, containers=USES_CFG))
    await start(scene)
    first = await scene.wait_recorded_on("Job", "migrate")
    old_uid = first["metadata"]["uid"]

    async def recorded_job_refused() -> bool:
        probe = workload("Job", f"probe-{secrets.token_hex(3)}", containers=USES_CFG)
        probe["metadata"]["annotations"] = {RECORD_ANNOTATION: "probe"}
        try:
            await scene.create_workload(probe)
        except ApiError as error:
            return "refused by the test" in error.message
        await scene.api.delete(scene_job_path(scene, probe["metadata"]["name"]))
        return False

    no_record = (
        f"!has(object.metadata.annotations) || "
        f"!('{RECORD_ANNOTATION}' in object.metadata.annotations)"
    )
    async with refusing(
        scene,
        resource="jobs",
        operation="CREATE",
        expression=no_record,
        refused=recorded_job_refused,
    ):
        with caplog.at_level(logging.ERROR, logger="reloader"):
            await change_cfg(scene, "2")
            await wait_for(lambda: _refused_logged(caplog), message="the new Job refused")
        assert await job_or_none(scene, "migrate") is None
        assert len(await pending_copies(scene)) == 1
        await scene.stop_controllers()

    await start(scene)
    second = await wait_replaced(scene, "migrate", old_uid=old_uid)
    assert record_of(second) not in (None, record_of(first))
    await assert_replaced_once(scene, second, old_uid=old_uid)

    await change_cfg(scene, "3")
    await wait_replaced(scene, "migrate", old_uid=second["metadata"]["uid"])


async def _refused_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return any("replacement refused" in r.getMessage() for r in caplog.records)


def scene_job_path(scene: Cluster, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{scene.namespace}/jobs/{name}"


class JobDeleteUnanswered(Api):
    """A stand-in for a fault a real server cannot be made to produce on demand: the first Job
    DELETE gets no answer (a timeout, a reset connection), whether or not the server carried it
    out (``carried_out``). Every other request, and a DELETE carried out, go to the real server."""

    def __init__(self, configuration: client.Configuration, *, carried_out: bool) -> None:
        super().__init__(configuration)
        self.carried_out, self.lost = carried_out, 0

    async def delete(self, path: str, **options: Any) -> None:
        if "/jobs/" not in path or self.lost:
            return await super().delete(path, **options)
        self.lost += 1
        if self.carried_out:
            await super().delete(path, **options)
        raise ApiUnavailable(0, "ServerDisconnectedError", "no answer")


@pytest.mark.parametrize("carried_out", [True, False], ids=["deleted", "not-deleted"])
async def test_a_job_delete_without_an_answer_still_replaces_the_job_once(
    cluster: TestCluster, scene: Cluster, carried_out: bool
) -> None:
    """
    1. An auto Job reads cfg; recorded by a controller whose first Job DELETE gets no answer,
       the server having deleted the Job (``deleted``) or not (``not-deleted``).
    2. cfg changes.
    Result: the Job is replaced, once, and no copy is left. Before, an unanswered delete counted
    as "not deleted" and the copy was dropped: with ``deleted`` the Job was gone for good.
    (``not-deleted`` passed before too: it guards the other half of "maybe deleted", where the
    old Job is found still there and the change is decided again.)
    """
    configuration = client.Configuration()
    await config.load_kube_config_from_dict(
        dict(cluster.kubeconfig), client_configuration=configuration, temp_file_path=None
    )
    api = JobDeleteUnanswered(configuration, carried_out=carried_out)
    try:
        await scene.create_configmap("cfg", {"a": "1"})
        await scene.create_workload(
            workload("Job", "migrate", annotations=AUTO, containers=USES_CFG)
        )
        settings = Settings(
            namespaces=[scene.namespace],
            controller_namespace=scene.namespace,
            debounce_seconds=0.2,
            min_restart_interval_seconds=0,
        )
        controller = Controller(
            settings=settings, api=api, digest_key=DigestKey.from_secret(TEST_KEY)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        scene.controllers.append((controller, stop, task))
        await asyncio.wait_for(controller.wait_synced(), timeout=30)
        first = await scene.wait_recorded_on("Job", "migrate")

        await change_cfg(scene, "2")

        old_uid = first["metadata"]["uid"]
        second = await wait_replaced(scene, "migrate", old_uid=old_uid)
        assert api.lost == 1
        await assert_replaced_once(scene, second, old_uid=old_uid)
    finally:
        await scene.stop_controllers()
        await api.close()


# --- the digest key: what waiting cannot fix ends the start with what to do ----------------------


def missing_namespace() -> str:
    return f"t-missing-{secrets.token_hex(4)}"


async def test_a_missing_controller_namespace_stops_the_start_saying_what_to_do(
    scene: Cluster,
) -> None:
    """Before, the controller retried the Secret's create (404) forever with a vague warning."""
    namespace = missing_namespace()
    settings = Settings(hash_key=None, controller_namespace=namespace)

    with pytest.raises(StartupError) as raised:
        await asyncio.wait_for(load_digest_key(scene.api, settings), timeout=10)

    message = str(raised.value)
    for hint in (namespace, "does not exist", "--controller-namespace", "RELOADER_HASH_KEY"):
        assert hint in message, message
    with pytest.raises(ApiNotFound):
        await scene.api.get(f"/api/v1/namespaces/{namespace}")  # not created behind our back


async def test_the_process_exits_2_when_its_namespace_is_missing(
    cluster: TestCluster, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig))
    argv = [
        sys.executable,
        "-m",
        "reloader",
        f"--kubeconfig={kubeconfig}",
        f"--controller-namespace={missing_namespace()}",
        "--metrics-port=0",
        "--log-format=text",
    ]
    result = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot start" in result.stderr and "does not exist" in result.stderr, result.stderr


async def test_a_forbidden_key_secret_names_the_missing_permission(
    admin_api: Api, cluster: TestCluster, scene: Cluster
) -> None:
    """A ServiceAccount without any RBAC: before, a 403 was retried forever."""
    account = {"metadata": {"name": "no-rights"}}
    await scene.api.create(f"/api/v1/namespaces/{scene.namespace}/serviceaccounts", account)
    api = await service_account_api(
        admin_api, cluster.kubeconfig, namespace=scene.namespace, name="no-rights"
    )
    try:
        settings = Settings(hash_key=None, controller_namespace=scene.namespace)
        with pytest.raises(StartupError) as raised:
            await asyncio.wait_for(load_digest_key(api, settings), timeout=10)
    finally:
        await api.close()
    message = str(raised.value)
    for hint in ("forbidden to get", "reloader-hash-key", scene.namespace, "RELOADER_HASH_KEY"):
        assert hint in message, message
