"""Building blocks for scenario tests against a real API server.

Objects are created and read with the controller's own raw client (real HTTP, real server), and
the controller runs in the test's event loop, scoped to the test's namespace, so each test sees
only its own objects and starts in about a second.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from reloader.app import Controller
from reloader.digests import DigestKey
from reloader.kube import Api, ApiNotFound, ApiTooManyRequests, connect_with_dict
from reloader.model import CONFIGMAPS, EVENTS, KINDS, LAST_RELOADED_FROM, RECORD_ANNOTATION, SECRETS
from reloader.settings import Settings
from tests.controlplane.envtest import ControlPlane

T = TypeVar("T")
TEST_KEY = b"reloader-test-digest-key-0123456789"
QUIET = 1.5
"""Seconds a negative test watches for a restart that must not come (debounce is 0.2 s)."""
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
NAMESPACED_RBAC = (
    MANIFESTS / "overlays/namespaced/role.yaml",
    MANIFESTS / "base/hash-key-role.yaml",
)
"""The namespaced overlay's RBAC files: its Role and the controller-namespace Role of the base."""
SERVICE_ACCOUNT = "reloader"
Change = Callable[[], Awaitable[object]]
"""A change a test makes to the cluster (a config edit, a controller restart...)."""


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


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET from a controller's HTTP port on 127.0.0.1: (status, body), or (0, "") while nothing
    answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def answers_ok(port: int, path: str) -> Callable[[], Awaitable[bool]]:
    """A ``wait_for`` probe: whether ``path`` on the controller's port answers 200."""

    async def probe() -> bool:
        return (await asyncio.to_thread(http_get, port, path))[0] == 200

    return probe


def refusal_policy(
    name: str,
    namespace: str,
    *,
    group: str,
    resource: str,
    operation: str,
    expression: str,
    message: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ValidatingAdmissionPolicy and its binding that refuse ``operation`` on ``resource`` in
    ``namespace`` unless the CEL ``expression`` holds: a real server's permanent refusal."""
    selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    rule = {
        "apiGroups": [group],
        "apiVersions": ["v1"],
        "operations": [operation],
        "resources": [resource],
    }
    policy = {
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [rule], "namespaceSelector": selector},
            "validations": [{"expression": expression, "message": message}],
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


def container(name: str = "app", /, **extra: Any) -> dict[str, Any]:
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


def marker_source(marker: str) -> tuple[str, str]:
    """(config kind, name) a ``last-reloaded-from`` marker names, e.g. ("ConfigMap", "cfg")."""
    parsed = json.loads(marker)
    kind = {"CONFIGMAP": "ConfigMap", "SECRET": "Secret"}[parsed["type"]]
    return kind, str(parsed["name"])


def refused(api: Api) -> dict[tuple[str, str], int]:
    """The requests the server answered 403, by (method, status): RBAC drift shows here."""
    return {key: n for key, n in api.statistics().requests.items() if key[1] == "403"}


def audited_writes(plane: ControlPlane, user: str) -> list[str]:
    """Every write ``user`` made, as the apiserver's audit log has it ("patch deployments/web")."""
    found = []
    for event in plane.audit_events(user):
        if event.get("verb") in WRITE_VERBS and event.get("stage") == "ResponseComplete":
            ref = event.get("objectRef", {})
            resource = "/".join(filter(None, [ref.get("resource"), ref.get("subresource")]))
            found.append(f"{event['verb']} {resource}/{ref.get('name', '')}")
    return found


def with_token(kubeconfig: Mapping[str, Any], token: str) -> dict[str, Any]:
    """The same server and CA, authenticated by ``token`` alone."""
    result = copy.deepcopy(dict(kubeconfig))
    context = next(c for c in result["contexts"] if c["name"] == result["current-context"])
    user = next(u for u in result["users"] if u["name"] == context["context"]["user"])
    user["user"] = {"token": token}
    return result


@dataclass
class Cluster:
    """The test's namespace on the real server, with shortcuts for the objects tests use."""

    api: Api
    namespace: str
    controllers: list[tuple[Controller, asyncio.Event, asyncio.Task[None]]] = field(
        default_factory=list
    )
    apis: list[Api] = field(default_factory=list)
    """Clients of other identities made for this test, closed after its controllers stop."""

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

    async def pod_template(self, kind: str, name: str) -> dict[str, Any]:
        """A workload's pod template as the server has it: what rolls the pods when it changes."""
        node: Any = await self.get_workload(kind, name)
        for step in KINDS[kind].pod_template_path:  # type: ignore[index]
            node = node.get(step) or {}
        return dict(node)

    async def marker(self, kind: str, name: str) -> str | None:
        """The restart marker on a workload's pod template, if any."""
        template = await self.pod_template(kind, name)
        found = (template.get("metadata") or {}).get("annotations", {}).get(LAST_RELOADED_FROM)
        return str(found) if found is not None else None

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

    async def settled_replica_sets(self, name: str) -> set[str]:
        """The ReplicaSets of a Deployment once its controller has seen its latest spec."""

        async def observed() -> bool:
            obj = await self.get_deployment(name)
            seen = obj.get("status", {}).get("observedGeneration", 0)
            return bool(seen >= obj["metadata"]["generation"] and await self.replica_sets(name))

        await wait_for(observed, message=f"Deployment {name} observed by its controller")
        return {rs["metadata"]["name"] for rs in await self.replica_sets(name)}

    async def assert_not_restarted(
        self, name: str, wrong: Change, *, kind: str = "Deployment", quiet: float = QUIET
    ) -> None:
        """Make ``wrong`` alone and check, after ``quiet`` seconds, that nothing restarted.

        The evidence is the server's: the pod template is unchanged (a restart by either strategy
        changes it; record writes touch only metadata) and, for a Deployment, no ReplicaSet was
        added. ``quiet`` must outlast the debounce plus the controller's reaction; the caller then
        proves the controller was alive (``assert_not_restarted_then_restarts``), or this proves
        nothing.
        """
        before = await self.pod_template(kind, name)
        sets = await self.settled_replica_sets(name) if kind == "Deployment" else set()
        await wrong()
        await asyncio.sleep(quiet)
        assert await self.pod_template(kind, name) == before, f"{kind} {name} was restarted"
        if kind == "Deployment":
            now = {rs["metadata"]["name"] for rs in await self.replica_sets(name)}
            assert now == sets, f"{name} rolled out: ReplicaSets {sorted(sets)} -> {sorted(now)}"

    async def assert_not_restarted_then_restarts(
        self,
        name: str,
        *,
        wrong: Change,
        right: Change,
        source: tuple[str, str] | None,
        kind: str = "Deployment",
        quiet: float = QUIET,
    ) -> None:
        """The discriminating negative check: ``wrong`` alone restarts nothing, then ``right``
        restarts exactly once and the marker names ``source`` (config kind, name).

        Making both changes inside one debounce window proves nothing: one rollout appears
        whether or not the first was ignored. Here the first is judged on its own, and the second
        shows the controller was alive and watching when it was made. ``source=None`` is for the
        env-vars strategy, which leaves no marker: the template must still change.
        """
        await self.assert_not_restarted(name, wrong, kind=kind, quiet=quiet)
        before = await self.pod_template(kind, name)
        sets = await self.settled_replica_sets(name) if kind == "Deployment" else set()
        await right()

        async def changed() -> dict[str, Any] | None:
            template = await self.pod_template(kind, name)
            return template if template != before else None

        await wait_for(changed, message=f"{kind} {name} restarted by the change that must")
        if source is not None:
            marker = await self.marker(kind, name)
            assert marker is not None, f"{kind} {name} restarted without a marker"
            assert marker_source(marker) == source, f"the marker names another config: {marker}"
        if kind == "Deployment":
            await self.assert_replica_sets_stay(name, len(sets) + 1)

    async def audited_api(self, plane: ControlPlane, user: str) -> Api:
        """A cluster-admin client as ``user``, whose requests the audit log records (see
        ``audited_writes``); closed at teardown."""
        api = await connect_with_dict(plane.audited_kubeconfig(user))
        self.apis.append(api)
        return api

    async def as_service_account(self, kubeconfig: Mapping[str, Any]) -> Api:
        """A client of ServiceAccount ``reloader`` in this namespace, bound to the namespaced
        overlay's Roles exactly as shipped (``NAMESPACED_RBAC``; this namespace is also the
        controller's), with a TokenRequest token; closed at teardown.

        Running a controller with it proves the shipped RBAC covers what that test exercises:
        a missing grant is a 403 (``refused``) and a reload that never comes.
        """
        accounts = f"/api/v1/namespaces/{self.namespace}/serviceaccounts"
        await self.api.create(accounts, {"metadata": {"name": SERVICE_ACCOUNT}})
        rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces"
        rules: list[dict[str, Any]] = []
        docs = [d for path in NAMESPACED_RBAC for d in yaml.safe_load_all(path.read_text())]
        for doc in docs:
            doc["metadata"]["namespace"] = self.namespace
            for subject in doc.get("subjects", []):
                subject["namespace"] = self.namespace
            rules += doc.get("rules", [])
            plural = "roles" if doc["kind"] == "Role" else "rolebindings"
            await self.api.create(f"{rbac}/{self.namespace}/{plural}", doc)
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
        answer: dict[str, Any] = dict(
            await self.api.create(f"{accounts}/{SERVICE_ACCOUNT}/token", request)
        )
        api = await connect_with_dict(with_token(kubeconfig, answer["status"]["token"]))
        self.apis.append(api)
        await self._wait_allowed(api, rules)
        return api

    async def _wait_allowed(self, api: Api, rules: list[dict[str, Any]]) -> None:
        """Wait until the authorizer grants ``api`` every rule (it lags RBAC writes briefly)."""
        pending = [
            (group, resource, verb, name)
            for rule in rules
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
            for name in rule.get("resourceNames") or [""]
        ]

        async def all_allowed() -> bool:
            for grant in list(pending):
                if await self._allowed(api, *grant):
                    pending.remove(grant)
            return not pending

        await wait_for(all_allowed, timeout=15, message=f"RBAC in effect: {pending}")

    async def _allowed(self, api: Api, group: str, resource: str, verb: str, name: str) -> bool:
        """Whether the server authorises ``api`` (a SelfSubjectAccessReview in this namespace)."""
        resource, _, subresource = resource.partition("/")
        attributes = {"namespace": self.namespace, "group": group, "verb": verb, "name": name}
        attributes |= {"resource": resource, "subresource": subresource}
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        answer: dict[str, Any] = dict(await api.create(path, review))
        return bool(answer.get("status", {}).get("allowed"))

    async def start_controller(
        self, *, digest_key: bytes = TEST_KEY, api: Api | None = None, **overrides: Any
    ) -> Controller:
        """Run a controller on this namespace in the test's event loop; stopped at teardown.

        ``api`` runs it as another identity (a ServiceAccount, an audited user); by default it
        shares the test's admin client.
        """
        options: dict[str, Any] = {
            "namespaces": [self.namespace],
            "debounce_seconds": 0.2,
            "min_restart_interval_seconds": 0,
            **overrides,
        }
        settings = Settings(**options)
        controller = Controller(
            settings=settings, api=api or self.api, digest_key=DigestKey.from_secret(digest_key)
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
        for other in cluster.apis:
            await other.close()


async def exists(api: Api, path: str) -> bool:
    """Whether ``path`` is served now (a 429 while a new CRD's storage initialises counts as no)."""
    try:
        await api.get(path)
    except (ApiNotFound, ApiTooManyRequests):
        return False
    return True
