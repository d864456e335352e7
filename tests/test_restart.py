"""Failures of the restart write: permanent ones are counted, logged and reported; transient ones
are retried through the queue.

The permanent failure is a real one: a ValidatingAdmissionPolicy on the real API server refuses any
Deployment update that sets the restart marker (recording digests still passes). A transient
failure (409, 429, 5xx) cannot be produced on demand by a real server, so that one test drives the
worker loop with a stand-in restarter that fails twice with a 503 and then succeeds; it checks only
the queue plumbing, nothing about Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from reloader.decide import Decision
from reloader.kube import ApiUnavailable
from reloader.metrics import Metrics
from reloader.model import WorkloadKey
from reloader.queue import WorkQueue
from reloader.restart import Outcome, RestartFailed, run_worker
from tests.scenario import Cluster, container, deployment, env_from, wait_for

ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def freeze_policy(namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    name = f"freeze-restarts-{namespace}"
    selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    rules = [
        {
            "apiGroups": ["apps"],
            "apiVersions": ["v1"],
            "operations": ["UPDATE"],
            "resources": ["deployments"],
        }
    ]
    expression = (
        "!has(object.spec.template.metadata.annotations) || "
        "!('reloader.stakater.com/last-reloaded-from' in object.spec.template.metadata.annotations)"
    )
    policy = {
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": rules, "namespaceSelector": selector},
            "validations": [{"expression": expression, "message": "restarts are frozen here"}],
        },
    }
    binding = {
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": selector},
        },
    }
    return policy, binding


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


class FlakyRestarter:
    """Stand-in for the server fault a real API server cannot be made to produce: two 503s."""

    def __init__(self) -> None:
        self.calls = 0

    async def sync(self, key: WorkloadKey) -> Outcome:
        self.calls += 1
        if self.calls <= 2:
            error = ApiUnavailable(503, "ServiceUnavailable", "etcd leader changed")
            raise RestartFailed(key, Decision("restart", None, (), "x"), error)
        return Outcome("restart")


async def test_transient_failures_are_retried_with_backoff_until_success() -> None:
    queue: WorkQueue[WorkloadKey] = WorkQueue(base_delay=0.01)
    restarter = FlakyRestarter()
    metrics = Metrics()
    settled: list[WorkloadKey] = []
    key = WorkloadKey("Deployment", "ns", "web")
    queue.add(key)
    worker = asyncio.create_task(
        run_worker(queue=queue, restarter=restarter, metrics=metrics, settled=settled.append)  # type: ignore[arg-type]
    )

    async def done() -> bool:
        return bool(settled)

    await wait_for(done, timeout=10, message="the key settles after retries")
    await queue.shutdown(drain=True)
    await asyncio.wait_for(worker, timeout=10)

    assert restarter.calls == 3
    assert metrics.registry.get_sample_value("reloader_retries_total") == 2.0
    assert queue.num_requeues(key) == 0, "success forgets the failure count"
