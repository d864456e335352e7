"""Building blocks for scenario tests against a real API server.

Objects are created and read with the controller's own raw client (real HTTP, real server), and
the controller runs in the test's event loop, scoped to the test's namespace, so each test sees
only its own objects and starts in about a second.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from reloader.app import Controller
from reloader.digests import DigestKey
from reloader.kube import Api, ApiNotFound, ApiTooManyRequests
from reloader.model import CONFIGMAPS, EVENTS, KINDS, LAST_RELOADED_FROM, RECORD_ANNOTATION, SECRETS
from reloader.settings import Settings

T = TypeVar("T")
TEST_KEY = b"reloader-test-digest-key-0123456789"
QUIET = 1.5
"""Seconds a negative test watches for a restart that must not come (debounce is 0.2 s)."""


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 30.0, message: str
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        await asyncio.sleep(0.1)


def container(name: str = "app", **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "registry.invalid/app:1", **extra}


def deployment(
    name: str,
    *,
    annotations: Mapping[str, str] | None = None,
    template_annotations: Mapping[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"containers": containers or [container()]}
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "annotations": dict(annotations or {})},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name},
                    "annotations": dict(template_annotations or {}),
                },
                "spec": pod_spec,
            },
        },
    }


def workload(
    kind: str,
    name: str,
    *,
    annotations: Mapping[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A minimal object of any supported kind around the same pod spec as ``deployment``."""
    base = deployment(name, annotations=annotations, containers=containers, volumes=volumes)
    template, spec = base["spec"]["template"], base["spec"]
    if kind in ("Job", "CronJob"):
        template["spec"]["restartPolicy"] = "Never"
        template["metadata"].pop("labels")
        job_spec = {"template": template, "backoffLimit": 0}
        if kind == "Job":
            return {**base, "apiVersion": "batch/v1", "kind": "Job", "spec": job_spec}
        cron_spec = {"schedule": "0 0 1 1 *", "jobTemplate": {"spec": job_spec}}
        return {**base, "apiVersion": "batch/v1", "kind": "CronJob", "spec": cron_spec}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    if kind == "DaemonSet":
        spec.pop("replicas")
    if kind == "Rollout":
        return {**base, "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout"}
    return {**base, "kind": kind}


def env_from(kind: str, name: str) -> dict[str, Any]:
    ref = "configMapRef" if kind == "ConfigMap" else "secretRef"
    return {"envFrom": [{ref: {"name": name}}]}


def _metadata(
    name: str, annotations: Mapping[str, str] | None, labels: Mapping[str, str] | None
) -> dict[str, Any]:
    return {"name": name, "annotations": dict(annotations or {}), "labels": dict(labels or {})}


def writes(controller: Controller) -> float:
    """Records plus restarts (attempted) by one controller, from its own metrics.

    Tests use this rather than the workload's resourceVersion, which the Deployment controller's
    status updates also change.
    """
    registry = controller.metrics.registry
    samples = [
        ("reloader_records_total", {}),
        ("reloader_reload_executed_total", {"success": "true"}),
        ("reloader_reload_executed_total", {"success": "false"}),
    ]
    return sum(registry.get_sample_value(name, labels) or 0.0 for name, labels in samples)


@dataclass
class Cluster:
    """The test's namespace on the real server, with shortcuts for the objects tests use."""

    api: Api
    namespace: str
    controllers: list[tuple[Controller, asyncio.Event, asyncio.Task[None]]] = field(
        default_factory=list
    )

    async def create_configmap(
        self,
        name: str,
        data: Mapping[str, str],
        *,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        body = {"metadata": _metadata(name, annotations, labels), "data": dict(data)}
        await self.api.create(CONFIGMAPS.collection_path(self.namespace), body)

    async def create_secret(
        self,
        name: str,
        data: Mapping[str, str],
        *,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        body = {"metadata": _metadata(name, annotations, labels), "type": "Opaque", "data": encoded}
        await self.api.create(SECRETS.collection_path(self.namespace), body)

    async def patch_configmap(self, name: str, patch: Mapping[str, Any]) -> None:
        path = CONFIGMAPS.object_path(self.namespace, name)
        await self.api.patch(path, dict(patch), patch_type="merge")

    async def set_secret(self, name: str, data: Mapping[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        await self.api.patch(
            SECRETS.object_path(self.namespace, name), {"data": encoded}, patch_type="merge"
        )

    async def delete_configmap(self, name: str) -> None:
        await self.api.delete(CONFIGMAPS.object_path(self.namespace, name))

    async def create_workload(self, body: Mapping[str, Any]) -> None:
        kind = KINDS[body["kind"]]
        await self.api.create(kind.resource.collection_path(self.namespace), body)

    async def get_workload(self, kind: str, name: str) -> dict[str, Any]:
        path = KINDS[kind].resource.object_path(self.namespace, name)  # type: ignore[index]
        return dict(await self.api.get(path))

    async def marker(self, kind: str, name: str) -> str | None:
        """The restart marker on a workload's pod template, if any."""
        obj = await self.get_workload(kind, name)
        node: Any = obj
        for step in KINDS[kind].pod_template_path:  # type: ignore[index]
            node = node.get(step) or {}
        return (node.get("metadata") or {}).get("annotations", {}).get(LAST_RELOADED_FROM)

    async def wait_marker(self, kind: str, name: str, *, other_than: str | None = None) -> str:
        async def changed() -> str | None:
            found = await self.marker(kind, name)
            return found if found and found != other_than else None

        return await wait_for(changed, message=f"restart marker on {kind} {name}")

    async def wait_recorded_on(self, kind: str, name: str) -> dict[str, Any]:
        async def recorded() -> dict[str, Any] | None:
            obj = await self.get_workload(kind, name)
            return obj if RECORD_ANNOTATION in obj["metadata"].get("annotations", {}) else None

        return await wait_for(recorded, message=f"digests recorded on {kind} {name}")

    async def jobs(self) -> list[dict[str, Any]]:
        page = await self.api.list_page(
            KINDS["Job"].resource.collection_path(self.namespace), params=[]
        )
        return list(page.get("items", []))

    async def get_deployment(self, name: str) -> dict[str, Any]:
        path = KINDS["Deployment"].resource.object_path(self.namespace, name)
        return dict(await self.api.get(path))

    async def replica_sets(self, deployment_name: str) -> list[dict[str, Any]]:
        page = await self.api.list_page(
            f"/apis/apps/v1/namespaces/{self.namespace}/replicasets", params=[]
        )
        return [
            rs
            for rs in page.get("items", [])
            if any(
                o.get("name") == deployment_name for o in rs["metadata"].get("ownerReferences", [])
            )
        ]

    async def events(self, reason: str) -> list[dict[str, Any]]:
        page = await self.api.list_page(EVENTS.collection_path(self.namespace), params=[])
        return [e for e in page.get("items", []) if e.get("reason") == reason]

    async def wait_recorded(self, name: str) -> dict[str, Any]:
        """Wait until the controller has recorded digests on the Deployment (first sight)."""
        return await self.wait_recorded_on("Deployment", name)

    async def wait_replica_sets(self, name: str, count: int, *, timeout: float = 30) -> None:
        async def enough() -> bool:
            return len(await self.replica_sets(name)) >= count

        await wait_for(enough, timeout=timeout, message=f"{count} ReplicaSets of {name}")

    async def assert_replica_sets_stay(
        self, name: str, count: int, *, quiet: float = QUIET
    ) -> None:
        """Exactly ``count`` ReplicaSets now and after a quiet period (no late restart)."""
        await self.wait_replica_sets(name, count)
        await asyncio.sleep(quiet)
        found = len(await self.replica_sets(name))
        assert found == count, f"{name} has {found} ReplicaSets, expected exactly {count}"

    async def start_controller(
        self, *, digest_key: bytes = TEST_KEY, **overrides: Any
    ) -> Controller:
        """Run a controller on this namespace in the test's event loop; stopped at teardown."""
        options: dict[str, Any] = {
            "namespaces": [self.namespace],
            "debounce_seconds": 0.2,
            "min_restart_interval_seconds": 0,
            **overrides,
        }
        settings = Settings(**options)
        controller = Controller(
            settings=settings, api=self.api, digest_key=DigestKey.from_secret(digest_key)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        self.controllers.append((controller, stop, task))
        await asyncio.wait_for(controller.wait_synced(), timeout=30)
        return controller

    async def stop_controllers(self) -> None:
        for _, stop, task in self.controllers:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=30)
        self.controllers.clear()


@contextlib.asynccontextmanager
async def scenario(api: Api, namespace: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(api=api, namespace=namespace)
    try:
        yield cluster
    finally:
        await cluster.stop_controllers()


async def exists(api: Api, path: str) -> bool:
    """Whether ``path`` is served now (a 429 while a new CRD's storage initialises counts as no)."""
    try:
        await api.get(path)
    except (ApiNotFound, ApiTooManyRequests):
        return False
    return True
