"""Annotation values written to hurt, and exclusions on the pod template, against a real API server.

Before RE2 and the linear duration parser, one workload with ``(a|a)*b`` and a ConfigMap named
with 40 ``a``s froze the single event loop (every watch, worker and probe, for every namespace),
and ``a{4294967296}`` or deep parentheses made the informer's transform raise, so the workload
kept a stale snapshot (here: none at all, so it never restarted).
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from reloader.annotations import DEFAULT_NAMES
from reloader.kube import Api, ApiNotFound
from reloader.model import NAMESPACES
from tests.scenario import QUIET, Cluster, container, deployment, env_from, wait_for

pytestmark = pytest.mark.cluster

AUTO = DEFAULT_NAMES.auto
NORMAL_LATENCY = 10.0
"""Seconds within which a restart normally shows (debounce 0.2 s, then one patch)."""
HOSTILE = {
    # Valid except the first item: the rest of the policy ("x.*") must still apply.
    DEFAULT_NAMES.configmap_reload: "a{4294967296}, x.*",
    # Valid for RE2; Python's recursive parser raised RecursionError on it.
    DEFAULT_NAMES.secret_reload: "(" * 2000 + "s" + ")" * 2000,
    # Quadratic for the old duration regex (about a minute per parse).
    DEFAULT_NAMES.pause_period: "1" * 100_000 + "x",
    AUTO: "yes please",
}


@pytest.fixture
async def other(admin_api: Api, namespace: str) -> AsyncIterator[Cluster]:
    """A second namespace, for a workload that has nothing to do with the hostile one."""
    name = f"{namespace[:50]}-b{secrets.token_hex(2)}"
    await admin_api.create(NAMESPACES.collection_path(None), {"metadata": {"name": name}})
    yield Cluster(api=admin_api, namespace=name)
    with contextlib.suppress(ApiNotFound):
        await admin_api.delete(f"{NAMESPACES.collection_path(None)}/{name}")


def _marker_names(marker: str) -> tuple[str, str]:
    parsed = json.loads(marker)
    return parsed["type"], parsed["name"]


async def _warnings_for(scene: Cluster, name: str) -> list[dict[str, Any]]:
    events = await scene.events("InvalidAnnotation")
    return [e for e in events if e["involvedObject"]["name"] == name]


@pytest.mark.timeout(180)
async def test_hostile_values_neither_stall_the_controller_nor_stale_the_workload(
    scene: Cluster, other: Cluster
) -> None:
    """1. Namespace A: a workload named-listing ``(a|a)*b`` and a ConfigMap named 40 ``a``s;
       a workload whose annotations overflow, nest 2000 deep and hold a 100 kB duration.
    2. Namespace B: an ordinary auto workload.
    3. The ``a…a`` ConfigMap changes (every pattern in A is tried on it), then B's config.
    Result: B restarts within normal latency; the hostile workload's valid item still restarts
    it; it gets exactly one Warning Event listing its three problems, even after two writes.
    """
    await scene.create_configmap("a" * 40, {"v": "1"})
    await scene.create_configmap("x-config", {"v": "1"})
    await scene.create_workload(
        deployment(
            "backtrack", annotations={AUTO: "true", DEFAULT_NAMES.configmap_reload: "(a|a)*b"}
        )
    )
    await scene.create_workload(deployment("hostile", annotations=HOSTILE))
    await other.create_configmap("app-config", {"v": "1"})
    victim = [container(**env_from("ConfigMap", "app-config"))]
    await other.create_workload(deployment("victim", annotations={AUTO: "true"}, containers=victim))
    await scene.start_controller(namespaces=[scene.namespace, other.namespace])
    await other.wait_recorded("victim")
    await scene.wait_recorded("hostile")

    await scene.patch_configmap("a" * 40, {"data": {"v": "2"}})
    await other.patch_configmap("app-config", {"data": {"v": "2"}})

    async def victim_restarted() -> str | None:
        return await other.marker("Deployment", "victim")

    marker = await wait_for(victim_restarted, timeout=NORMAL_LATENCY, message="victim restart")
    assert _marker_names(marker) == ("CONFIGMAP", "app-config")

    await scene.patch_configmap("x-config", {"data": {"v": "2"}})
    marker = await scene.wait_marker("Deployment", "hostile")
    assert _marker_names(marker) == ("CONFIGMAP", "x-config")
    await scene.assert_replica_sets_stay("hostile", 2, quiet=QUIET)

    warnings = await _warnings_for(scene, "hostile")
    assert len(warnings) == 1, [w["message"] for w in warnings]
    message = warnings[0]["message"]
    assert warnings[0]["type"] == "Warning"
    assert message.startswith("3 invalid annotation value(s) ignored: ")
    for key in (DEFAULT_NAMES.configmap_reload, DEFAULT_NAMES.pause_period, AUTO):
        assert key in message
    assert len(message) <= 1024
    assert await _warnings_for(scene, "backtrack") == []


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret"])
async def test_exclude_on_the_pod_template_only_is_honoured(scene: Cluster, kind: str) -> None:
    """Stakater's e2e case (pending there): ``auto`` and the exclude list on the template only.

    1. A Deployment reads two configs; its template excludes one of them.
    2. The excluded config changes alone; a quiet period passes.
    3. The other config changes.
    Result: no rollout after step 2; one after step 3, and its marker names the other config.
    """
    exclude = (
        DEFAULT_NAMES.configmaps_exclude if kind == "ConfigMap" else DEFAULT_NAMES.secrets_exclude
    )
    create = scene.create_configmap if kind == "ConfigMap" else scene.create_secret
    for name in ("excluded", "used"):
        await create(name, {"v": "1"})
    ref = "configMapRef" if kind == "ConfigMap" else "secretRef"
    both = [container(envFrom=[{ref: {"name": "excluded"}}, {ref: {"name": "used"}}])]
    template = {AUTO: "true", exclude: "excluded"}
    await scene.create_workload(deployment("web", template_annotations=template, containers=both))
    await scene.start_controller()
    await scene.wait_recorded("web")
    await scene.assert_replica_sets_stay("web", 1)

    await _change(scene, kind, "excluded")
    await scene.assert_replica_sets_stay("web", 1)

    await _change(scene, kind, "used")
    await scene.assert_replica_sets_stay("web", 2)
    marker = await scene.marker("Deployment", "web")
    assert marker is not None
    assert _marker_names(marker) == (kind.upper(), "used")


async def _change(scene: Cluster, kind: str, name: str) -> None:
    if kind == "ConfigMap":
        await scene.patch_configmap(name, {"data": {"v": "2"}})
    else:
        await scene.set_secret(name, {"v": "2"})
