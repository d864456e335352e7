"""Restarts of independent workloads are in flight together, not one per worker in turn.

A worker used to sync one key at a time, so a fan-out waited on the API server's latency once per
workload per worker. The loopback fault proxy (``tests/faultproxy.py``) holds every PATCH of a
Deployment for a while before passing it on to the real server, and counts the PATCHes it holds
at once: with a single worker, several restarts must be held together (before: never more than
one). The count is the evidence, not a duration.
"""

from __future__ import annotations

import pytest

from reloader.restart import MAX_SYNCS_IN_FLIGHT, syncs_per_worker
from tests.conftest import TestCluster
from tests.faultproxy import Fault, FaultProxy
from tests.scenario import Cluster, container, deployment, env_from, wait_for

AUTO = {"reloader.stakater.com/auto": "true"}
COUNT = 6
HOLD = 1.0


def held(proxy: FaultProxy) -> int:
    """PATCHes of Deployments the proxy has received and not answered yet."""
    received = proxy.requests[("PATCH", "patch deployments")]
    answered = sum(1 for a in proxy.log if a.request_class == "patch deployments")
    return received - answered


@pytest.mark.cluster
async def test_one_worker_has_several_restarts_in_flight(
    cluster: TestCluster, scene: Cluster
) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    for i in range(COUNT):
        containers = [container(**env_from("ConfigMap", "cfg"))]
        await scene.create_workload(deployment(f"app-{i}", annotations=AUTO, containers=containers))
    async with FaultProxy(cluster.kubeconfig) as proxy:
        proxy.add_fault(
            Fault(delay=HOLD, methods=frozenset({"PATCH"}), path_contains="/deployments/")
        )
        await scene.start_controller(api=proxy.api(), workers=1)
        for i in range(COUNT):
            await scene.wait_recorded(f"app-{i}")
        markers = {i: await scene.marker("Deployment", f"app-{i}") for i in range(COUNT)}

        most = 0
        await scene.patch_configmap("cfg", {"data": {"a": "2"}})

        async def all_restarted() -> bool:
            nonlocal most
            most = max(most, held(proxy))
            for i in range(COUNT):
                if await scene.marker("Deployment", f"app-{i}") == markers[i]:
                    return False
            return True

        await wait_for(all_restarted, timeout=60, message="every Deployment restarted")
        await scene.stop_controllers()  # before the proxy closes the controller's client
    assert most >= 2, f"at most {most} restart in flight with one worker"


@pytest.mark.parametrize(
    ("workers", "burst", "each"),
    [
        pytest.param(4, 50, 12, id="defaults: 48 in flight"),
        pytest.param(4, 1000, 16, id="a high burst: capped at 64 in all"),
        pytest.param(1, 50, 50, id="one worker takes the whole burst"),
        pytest.param(8, 3, 1, id="a burst under the workers: one each"),
    ],
)
def test_syncs_in_flight_follow_the_restart_burst(workers: int, burst: int, each: int) -> None:
    assert syncs_per_worker(workers=workers, restart_burst=burst) == each
    assert workers * each <= max(workers, MAX_SYNCS_IN_FLIGHT)
