"""Bad input and faults the controller must survive with a clear log line, still doing its job.

All real: a namespace the controller's user may not read (RBAC), a ConfigMap near the size limit
(one watch event far longer than aiohttp's line limit), and a ConfigMap deleted and recreated.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from reloader.app import Controller
from reloader.digests import DigestKey
from reloader.kube import connect_with_dict
from reloader.model import NAMESPACES
from reloader.settings import Settings
from tests.conftest import TestCluster
from tests.scenario import TEST_KEY, Cluster, container, deployment, env_from

pytestmark = pytest.mark.cluster
AUTO = {"reloader.stakater.com/auto": "true"}
RBAC = "/apis/rbac.authorization.k8s.io/v1"
READ = ["list", "watch"]


def namespace_role(user: str) -> tuple[dict[str, Any], dict[str, Any]]:
    rules = [
        {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": READ},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments", "statefulsets", "daemonsets"],
            "verbs": [*READ, "patch"],
        },
        {"apiGroups": ["batch"], "resources": ["cronjobs", "jobs"], "verbs": READ},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    role = {"metadata": {"name": "limited"}, "rules": rules}
    binding = {
        "metadata": {"name": "limited"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "limited"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    return role, binding


async def test_a_forbidden_namespace_is_logged_and_does_not_block_the_others(
    cluster: TestCluster, scene: Cluster, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """The controller is told to watch two namespaces but may read only one (a typo in a Helm
    value, a missing RoleBinding). It reports the forbidden one and keeps reloading the other."""
    if cluster.plane is None:
        pytest.skip("mints a client certificate: local control plane only")
    user = f"limited-{scene.namespace}"
    role, binding = namespace_role(user)
    await scene.api.create(f"{RBAC}/namespaces/{scene.namespace}/roles", role)
    await scene.api.create(f"{RBAC}/namespaces/{scene.namespace}/rolebindings", binding)
    forbidden = f"{scene.namespace}-x"
    await scene.api.create(NAMESPACES.collection_path(None), {"metadata": {"name": forbidden}})
    await scene.create_configmap("cfg", {"a": "1"})
    containers = [container(**env_from("ConfigMap", "cfg"))]
    await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
    api = await connect_with_dict(cluster.plane.user_kubeconfig(user))
    settings = Settings(
        namespaces=[scene.namespace, forbidden],
        debounce_seconds=0.2,
        min_restart_interval_seconds=0,
    )
    controller = Controller(settings=settings, api=api, digest_key=DigestKey.from_secret(TEST_KEY))
    stop = asyncio.Event()
    try:
        with caplog.at_level(logging.ERROR, logger="reloader"):
            task = asyncio.create_task(controller.run(stop))
            await asyncio.wait_for(controller.wait_synced(), timeout=30)
            assert controller.ready()[0]
            await scene.wait_recorded("web")
            await scene.patch_configmap("cfg", {"data": {"a": "2"}})
            await scene.assert_replica_sets_stay("web", 2)
        messages = [r for r in caplog.records if r.getMessage().startswith("forbidden")]
        assert messages, "no log line names the forbidden namespace"
        assert any(getattr(r, "namespace", "") == forbidden for r in messages)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await api.close()
        await scene.api.delete(f"{NAMESPACES.collection_path(None)}/{forbidden}")


async def test_a_configmap_near_the_size_limit_is_handled(scene: Cluster) -> None:
    """~900 KiB in one key: the watch event is a single line of almost a megabyte."""
    big = "x" * (900 * 1024)
    await scene.create_configmap("big", {"blob": big})
    containers = [container(**env_from("ConfigMap", "big"))]
    await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
    await scene.start_controller()
    await scene.wait_recorded("web")

    await scene.patch_configmap("big", {"data": {"blob": big[:-1] + "y"}})

    await scene.assert_replica_sets_stay("web", 2)


async def test_deleted_then_recreated_with_new_content_restarts_once(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    containers = [container(**env_from("ConfigMap", "cfg"))]
    await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
    await scene.start_controller()
    await scene.wait_recorded("web")

    async def delete() -> None:
        await scene.delete_configmap("cfg")

    async def recreate_changed() -> None:
        await scene.create_configmap("cfg", {"a": "2"})

    await scene.assert_not_restarted_then_restarts(
        "web", wrong=delete, right=recreate_changed, source=("ConfigMap", "cfg")
    )


async def test_many_watched_namespaces_do_not_starve_writes(scene: Cluster) -> None:
    """25 namespaces and 7 kinds make 175 long-lived watches, more than one pool holds;
    patches and Events must still get through."""
    others = [f"{scene.namespace}-w{i}" for i in range(24)]
    for name in others:
        await scene.api.create(NAMESPACES.collection_path(None), {"metadata": {"name": name}})
    try:
        await scene.create_configmap("cfg", {"a": "1"})
        containers = [container(**env_from("ConfigMap", "cfg"))]
        await scene.create_workload(deployment("web", annotations=AUTO, containers=containers))
        await scene.start_controller(namespaces=[scene.namespace, *others])
        await scene.wait_recorded("web")

        await scene.patch_configmap("cfg", {"data": {"a": "2"}})

        await scene.assert_replica_sets_stay("web", 2)
    finally:
        for name in others:
            await scene.api.delete(f"{NAMESPACES.collection_path(None)}/{name}")
