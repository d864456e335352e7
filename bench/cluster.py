"""The benchmark's cluster: a local control plane that audits controller requests, object bodies,
and bulk creation with bounded concurrency.

Every controller under test authenticates with its own client certificate whose groups include
``tests.controlplane.envtest.AUDITED_GROUP``. The audit policy (``AUDIT_POLICY``, shared with
the tests) logs that group only, at ``Metadata`` level, so the audit log
holds exactly the controllers' requests: the bench's own requests and kube-controller-manager's are
not logged, and attributing requests needs no guess about user agents (``apiserver_request_total``
has no user or user-agent label on this version; see ``apicost``).

Workloads are created with ``replicas: 0``: a pod-template change still makes a new ReplicaSet, but
no Pods pile up in a cluster that has no nodes, so the control plane spends its CPU on the
controllers being measured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reloader.kube import Api, ApiConflict, ApiError, ApiNotFound
from reloader.model import CONFIG_RESOURCES, KINDS, NAMESPACES, ConfigKey, WorkloadKindName
from tests.controlplane.envtest import AUDIT_POLICY, ControlPlane

NAMESPACE_GONE_SECONDS = 180.0
"""How long a run's clean-up may take before the next run starts anyway (with a warning)."""
IN_FLIGHT = 50
PART_OF = {"app.kubernetes.io/part-of": "reloader-bench"}
AUTO = {"reloader.stakater.com/auto": "true"}
NEVER_SCHEDULE = "0 0 1 1 *"
"""A CronJob schedule that does not fire during a run, so every Job seen came from a reload."""


@dataclass
class BenchPlane:
    """A started control plane plus where its audit log is written."""

    plane: ControlPlane
    audit_log: Path

    def kubeconfig_for(self, user: str, directory: Path) -> Path:
        """A kubeconfig file for ``user`` (cluster-admin, audited), for a controller under test."""
        config = self.plane.audited_kubeconfig(user)
        path = directory / f"{user}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path


@contextlib.contextmanager
def bench_plane(work_dir: Path) -> Iterator[BenchPlane]:
    """Start etcd + apiserver (audited, more requests in flight) + controller-manager; remove all
    at exit."""
    work_dir.mkdir(parents=True, exist_ok=True)
    policy, audit_log = work_dir / "audit-policy.yaml", work_dir / "audit.log"
    policy.write_text(AUDIT_POLICY)
    args = [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={audit_log}",
        "--audit-log-format=json",
        "--audit-log-maxsize=0",
        "--max-requests-inflight=800",
        "--max-mutating-requests-inflight=400",
    ]
    with ControlPlane(extra_apiserver_args=args) as plane:
        yield BenchPlane(plane=plane, audit_log=audit_log)


# --- bodies ---------------------------------------------------------------------------------


def filler(size: int, seed: str) -> str:
    """Deterministic printable text of ``size`` bytes (a config value that is not all one byte)."""
    block = hashlib.sha256(seed.encode()).hexdigest()
    return (block * (size // len(block) + 1))[:size]


def configmap(name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": dict(PART_OF)}, "data": dict(data)}


def secret(name: str, data: Mapping[str, str]) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"metadata": {"name": name, "labels": dict(PART_OF)}, "type": "Opaque", "data": encoded}


def config_body(key: ConfigKey, data: Mapping[str, str]) -> dict[str, Any]:
    return configmap(key.name, data) if key.kind == "ConfigMap" else secret(key.name, data)


def encoded_data(key: ConfigKey, data: Mapping[str, str]) -> dict[str, str]:
    """``data`` as it is written for the kind (Secrets carry base64)."""
    if key.kind == "ConfigMap":
        return dict(data)
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def config_path(key: ConfigKey) -> str:
    return CONFIG_RESOURCES[key.kind].object_path(key.namespace, key.name)


def env_from(*refs: ConfigKey) -> dict[str, Any]:
    """A container fragment reading whole configs as environment variables."""
    entries = []
    for ref in refs:
        field = "configMapRef" if ref.kind == "ConfigMap" else "secretRef"
        entries.append({field: {"name": ref.name}})
    return {"envFrom": entries}


def key_env(ref: ConfigKey, key: str) -> dict[str, Any]:
    """A container fragment reading one key through ``valueFrom``."""
    field = "configMapKeyRef" if ref.kind == "ConfigMap" else "secretKeyRef"
    value_from = {field: {"name": ref.name, "key": key}}
    return {"env": [{"name": "VALUE", "valueFrom": value_from}]}


def volume(ref: ConfigKey, name: str = "config") -> dict[str, Any]:
    if ref.kind == "ConfigMap":
        return {"name": name, "configMap": {"name": ref.name}}
    return {"name": name, "secret": {"secretName": ref.name}}


def projected(refs: Sequence[ConfigKey], name: str = "projected") -> dict[str, Any]:
    sources = [
        {"configMap": {"name": r.name}} if r.kind == "ConfigMap" else {"secret": {"name": r.name}}
        for r in refs
    ]
    return {"name": name, "projected": {"sources": sources}}


def container(name: str = "app", **fragment: Any) -> dict[str, Any]:
    return {"name": name, "image": "registry.invalid/app:1", **fragment}


def pod_spec(
    containers: list[dict[str, Any]],
    *,
    init_containers: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers}
    if init_containers:
        spec["initContainers"] = init_containers
    if volumes:
        spec["volumes"] = volumes
    return spec


def workload(
    kind: WorkloadKindName,
    name: str,
    spec: Mapping[str, Any],
    *,
    annotations: Mapping[str, str] = AUTO,
) -> dict[str, Any]:
    """A workload of ``kind`` running ``spec``; zero replicas, a CronJob that never fires."""
    labels = {"app": name, **PART_OF}
    template = {"metadata": {"labels": labels}, "spec": dict(spec)}
    body: dict[str, Any] = {
        "apiVersion": f"{KINDS[kind].resource.group}/{KINDS[kind].resource.version}",
        "kind": kind,
        "metadata": {"name": name, "labels": dict(PART_OF), "annotations": dict(annotations)},
    }
    selector = {"matchLabels": {"app": name}}
    if kind == "CronJob":
        template["spec"]["restartPolicy"] = "Never"
        job = {"metadata": {"labels": dict(PART_OF)}, "spec": {"template": template}}
        body["spec"] = {"schedule": NEVER_SCHEDULE, "jobTemplate": job}
    elif kind == "DaemonSet":
        body["spec"] = {"selector": selector, "template": template}
    else:
        body["spec"] = {"replicas": 0, "selector": selector, "template": template}
    return body


def workload_path(kind: WorkloadKindName, namespace: str) -> str:
    return KINDS[kind].resource.collection_path(namespace)


# --- bulk creation --------------------------------------------------------------------------

Item = tuple[str, Mapping[str, Any]]
"""A collection URL and the body to POST there."""


async def _create_with_retry(api: Api, path: str, body: Mapping[str, Any]) -> None:
    """POST, absorbing "already exists" (a retried create) and retrying throttling and 5xx."""
    for attempt in range(8):
        try:
            await api.create(path, body)
            return
        except ApiConflict:
            return
        except ApiError as error:
            if not error.retryable or attempt == 7:
                raise
            await asyncio.sleep(0.2 * 2**attempt)


async def create_many(api: Api, items: Iterable[Item], *, in_flight: int = IN_FLIGHT) -> int:
    """Create every item with at most ``in_flight`` requests outstanding; returns how many.

    A fixed pool of senders pulls from one iterator, so 20k objects cost 50 coroutines, not 20k.
    """
    source = iter(items)
    created = 0

    async def sender() -> None:
        nonlocal created
        for path, body in source:
            await _create_with_retry(api, path, body)
            created += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(in_flight):
            group.create_task(sender())
    return created


async def create_namespaces(api: Api, names: Iterable[str]) -> None:
    items = [
        (NAMESPACES.collection_path(None), {"metadata": {"name": n, "labels": dict(PART_OF)}})
        for n in names
    ]
    await create_many(api, items)


async def delete_namespaces(
    api: Api, names: Iterable[str], *, wait_seconds: float = NAMESPACE_GONE_SECONDS
) -> bool:
    """Delete, and wait until the namespace controller has removed every object in them.

    The next run must not share the two cores with this one's clean-up: deleting 20 namespaces
    of Deployments, ReplicaSets, Pods and Events is minutes of work for the API server and etcd,
    and it fell on whichever contender ran next (a later round's p99 was up to 4x the first's).
    Returns whether they were all gone in time."""
    pending = list(names)
    for name in pending:
        with contextlib.suppress(ApiNotFound):
            await api.delete(f"{NAMESPACES.collection_path(None)}/{name}")
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while pending and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.5)
        pending = [name for name in pending if not await _gone(api, name)]
    if pending:
        print(f"  bench: {len(pending)} namespaces still terminating after {wait_seconds:.0f} s")
    return not pending


async def _gone(api: Api, namespace: str) -> bool:
    try:
        await api.get(f"{NAMESPACES.collection_path(None)}/{namespace}")
    except ApiNotFound:
        return True
    return False
