"""The foundation works: a real API server and controller-manager, driven by kubernetes_asyncio.

A strategic merge patch to a Deployment's pod template, sent through kubernetes_asyncio's
typed client (not the controller's raw client), makes the Deployment controller create a
second ReplicaSet.
If this fails, every other cluster test is meaningless.
"""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client, config

from tests.conftest import TestCluster
from tests.scenario import Cluster, container, deployment, wait_for

pytestmark = pytest.mark.cluster


async def test_pod_template_patch_creates_a_second_replica_set(
    cluster: TestCluster, scene: Cluster
) -> None:
    configuration = client.Configuration()
    await config.load_kube_config_from_dict(
        cluster.kubeconfig, client_configuration=configuration, temp_file_path=None
    )
    async with client.ApiClient(configuration=configuration) as api_client:
        apps = client.AppsV1Api(api_client)
        # The stubs want a V1Deployment; the client serializes a plain dict body just the same.
        await apps.create_namespaced_deployment(
            scene.namespace,
            deployment("smoke", containers=[container()]),  # type: ignore[arg-type]
        )
        await scene.wait_replica_sets("smoke", 1)

        patch = {"spec": {"template": {"metadata": {"annotations": {"smoke": "1"}}}}}
        # The stubs leave out ``_content_type``, which the client accepts and sends as Content-Type.
        await apps.patch_namespaced_deployment(  # type: ignore[call-arg]
            "smoke", scene.namespace, patch, _content_type="application/strategic-merge-patch+json"
        )

        async def two_replica_sets() -> bool:
            return len(await scene.replica_sets("smoke")) == 2

        await wait_for(two_replica_sets, message="a second ReplicaSet after the template patch")
