"""The manifests, proven against a real API server.

- Every overlay renders with kubectl's built-in kustomize and passes a server-side dry-run apply
  (schema, defaulting and admission of this very apiserver version).
- The RBAC grants exactly what ``reloader/permissions.py`` says the code needs: nothing missing,
  nothing extra, no wildcard.
- The controller, run as the shipped ServiceAccount (a TokenRequest token, nothing else), reloads a
  Deployment and a CronJob cluster-wide and a Deployment in single-namespace mode without receiving
  one 403, and in single-namespace mode is refused other namespaces' Secrets.

The 403 check is what catches drift between the code and the RBAC: a new API call nobody granted
fails here. The exact-set check catches the opposite, a grant nothing uses any more.

Installs get their own names (kustomize ``nameSuffix``) and namespace (kustomize ``namespace``,
the same customisation docs/install.md describes), so a run never meets another run's objects, and
cluster-scoped objects are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from reloader import permissions
from reloader.access import allowed
from reloader.app import Controller, load_digest_key
from reloader.kube import Api, ApiForbidden, ApiNotFound, connect_with_dict
from reloader.model import JOBS, KINDS, RECORD_ANNOTATION, SECRETS
from reloader.permissions import Permission
from reloader.settings import Settings
from tests.conftest import TestCluster
from tests.controlplane.envtest import ControlPlane, binary_dir
from tests.scenario import Cluster, container, deployment, env_from, wait_for

pytestmark = pytest.mark.cluster

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
OVERLAYS = ("cluster-wide", "namespaced", "servicemonitor")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
INSTALLED_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"}
INSTALLED_KINDS |= {"RoleBinding"}
"""What the RBAC tests apply: everything but the Deployment and Service (no image, no kubelet)."""
AUTO = {"reloader.stakater.com/auto": "true"}

Manifest = dict[str, Any]


# --- kubectl -------------------------------------------------------------------------------------


@functools.cache
def kubectl_binary() -> Path:
    path = binary_dir() / "kubectl"
    if not path.is_file():
        raise RuntimeError(f"{path} missing: run `bash tests/controlplane/build.sh` to build it")
    return path


async def kubectl(*args: str, stdin: str = "", kubeconfig: Path | None = None) -> str:
    """Run the built kubectl; fail the test with its stderr when it fails."""
    argv = [str(kubectl_binary()), *args]
    if kubeconfig is not None:
        # A discovery cache of its own: a CRD created a moment ago must be seen.
        argv += ["--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "cache")]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(stdin.encode())
    if process.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{err.decode()}")
    return out.decode()


def render(directory: Path) -> list[Manifest]:
    """``kubectl kustomize`` of a directory, as a list of objects (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_rendered_text(directory)) if doc]


@functools.cache
def _rendered_text(directory: Path) -> str:
    # Synchronous on purpose: rendering touches no server and takes a fraction of a second.
    result = subprocess.run(
        [str(kubectl_binary()), "kustomize", str(directory)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


def customized(tmp_path: Path, overlay: str, *, namespace: str, suffix: str = "") -> Path:
    """A kustomization of our own on top of ``overlay``: another namespace and name suffix."""
    directory = tmp_path / f"{overlay}-{namespace}{suffix}"
    directory.mkdir()
    # kustomize refuses absolute paths to other kustomizations: point at the overlay relatively.
    kustomization: Manifest = {
        "resources": [os.path.relpath(MANIFESTS / "overlays" / overlay, directory)],
        "namespace": namespace,
    }
    if suffix:
        kustomization["nameSuffix"] = suffix
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def find(objects: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def kubeconfig_file(cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kubectl") / "admin.kubeconfig"
    path.write_text(yaml.safe_dump(cluster.kubeconfig))
    return path


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_namespaced_objects_into_reloader(overlay: str) -> None:
    objects = render(MANIFESTS / "overlays" / overlay)
    for obj in objects:
        scoped = obj["kind"] in CLUSTER_SCOPED
        assert ("namespace" not in obj["metadata"]) == scoped, obj["metadata"]["name"]
        if not scoped:
            assert obj["metadata"]["namespace"] == "reloader"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "reloader"


def test_cluster_wide_is_the_base_unchanged() -> None:
    assert render(MANIFESTS / "overlays" / "cluster-wide") == render(MANIFESTS / "base")


def test_namespaced_overlay_has_no_cluster_scoped_object() -> None:
    """A tenant without cluster rights can install it, and ``kubectl delete -k`` cannot delete the
    namespace it shares with the applications."""
    objects = render(MANIFESTS / "overlays" / "namespaced")
    assert not [o for o in objects if o["kind"] in CLUSTER_SCOPED]


def test_namespaced_overlay_watches_its_own_namespace() -> None:
    objects = render(MANIFESTS / "overlays" / "namespaced")
    env = _env(find(objects, "Deployment", "reloader"))
    assert env["KUBERNETES_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_cluster_wide_deployment_watches_every_namespace() -> None:
    objects = render(MANIFESTS / "overlays" / "cluster-wide")
    env = _env(find(objects, "Deployment", "reloader"))
    assert "KUBERNETES_NAMESPACE" not in env
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def _env(deployment_obj: Manifest) -> dict[str, Any]:
    (container_spec,) = deployment_obj["spec"]["template"]["spec"]["containers"]
    return {
        item["name"]: item.get("valueFrom", item.get("value")) for item in container_spec["env"]
    }


def test_each_patch_file_holds_one_object() -> None:
    """kustomize 5.5 (kubectl 1.32) crashes on a file of several ``$patch: delete`` documents,
    and the kubectl built here does not, so this is checked as text."""
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            text = (kustomization.parent / patch["path"]).read_text()
            assert len([d for d in yaml.safe_load_all(text) if d]) == 1, patch["path"]


def test_deployment_is_hardened_probed_and_scrapable() -> None:
    objects = render(MANIFESTS / "base")
    workload = find(objects, "Deployment", "reloader")
    pod = workload["spec"]["template"]
    (main,) = pod["spec"]["containers"]
    assert pod["spec"]["serviceAccountName"] == "reloader"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert main["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    labels = pod["metadata"]["labels"]
    assert labels["app"] == "reloader"
    for key in ("name", "instance", "version", "component", "part-of"):
        assert f"app.kubernetes.io/{key}" in labels
    assert "app.kubernetes.io/managed-by" in workload["metadata"]["labels"]
    assert set(workload["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())


def test_metrics_service_and_servicemonitor_find_the_pod() -> None:
    objects = render(MANIFESTS / "overlays" / "servicemonitor")
    pod_labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = find(objects, "Service", "reloader-metrics")
    assert set(service["spec"]["selector"].items()) <= set(pod_labels.items())
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    monitor = find(objects, "ServiceMonitor", "reloader")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert set(selector.items()) <= set(service["metadata"]["labels"].items())
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


# --- server-side dry run -------------------------------------------------------------------------

SERVICEMONITOR_CRD: Manifest = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}
"""A stand-in for the Prometheus Operator's CRD, created only where none exists: it checks the
ServiceMonitor's kind, group, version and scope, not its spec (the real schema is not vendored)."""

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@pytest.fixture(scope="module")
async def servicemonitor_crd(admin_api: Api) -> AsyncIterator[None]:
    path = f"{CRDS}/{SERVICEMONITOR_CRD['metadata']['name']}"
    try:
        await admin_api.get(path)
        created = False  # a real one (an existing cluster with the operator): leave it alone
    except ApiNotFound:
        await admin_api.create(CRDS, SERVICEMONITOR_CRD)
        created = True

    async def established() -> bool:
        # Right after the create the server may answer with ``conditions: null``.
        status = (await admin_api.get(path)).get("status") or {}
        conditions = status.get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    await wait_for(established, timeout=30, message="ServiceMonitor CRD established")
    yield
    if created:
        with contextlib.suppress(ApiNotFound):
            await admin_api.delete(path)


@pytest.mark.usefixtures("servicemonitor_crd")
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_overlay_passes_server_side_dry_run(
    overlay: str, namespace: str, kubeconfig_file: Path, tmp_path: Path
) -> None:
    """Every object, the Deployment included, as the server would store it; in this test's
    namespace, because namespaced objects cannot be dry-run into a namespace that does not exist."""
    objects = render(customized(tmp_path, overlay, namespace=namespace))
    manifest = yaml.safe_dump_all(objects)
    out = await kubectl(
        "apply", "--dry-run=server", "-f", "-", stdin=manifest, kubeconfig=kubeconfig_file
    )
    applied = [line for line in out.splitlines() if line.endswith("(server dry run)")]
    assert len(applied) == len(objects), out


# --- RBAC: exactly what the code needs -----------------------------------------------------------


def granted(role: Manifest) -> frozenset[Permission]:
    """The (group, resource, verb, name) tuples a Role or ClusterRole grants."""
    result = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        result.add(Permission(group, resource, verb, name))
    return frozenset(result)


RBAC_CASES = [
    pytest.param("cluster-wide", "ClusterRole", "reloader", permissions.CLUSTER_ROLE, id="cluster"),
    pytest.param("cluster-wide", "Role", "reloader-hash-key", permissions.KEY_ROLE, id="key"),
    pytest.param("namespaced", "Role", "reloader", permissions.NAMESPACED_ROLE, id="namespaced"),
    pytest.param("namespaced", "Role", "reloader-hash-key", permissions.KEY_ROLE, id="ns-key"),
]


@pytest.mark.parametrize(("overlay", "kind", "name", "features"), RBAC_CASES)
def test_role_grants_exactly_what_the_code_needs(
    overlay: str, kind: str, name: str, features: tuple[permissions.Feature, ...]
) -> None:
    role = find(render(MANIFESTS / "overlays" / overlay), kind, name)
    have, need = granted(role), permissions.needed(features)
    assert not need - have, f"missing: {sorted(map(str, need - have))}"
    assert not have - need, f"not needed: {sorted(map(str, have - need))}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_wildcard_and_every_binding_names_our_service_account(overlay: str) -> None:
    objects = render(MANIFESTS / "overlays" / overlay)
    roles = {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"].endswith("Role")}
    for obj in objects:
        if obj["kind"].endswith("Role"):
            assert not [p for p in granted(obj) if "*" in (p.group, p.resource, p.verb)]
        if obj["kind"].endswith("RoleBinding"):
            ref = obj["roleRef"]
            assert (ref["kind"], ref["name"]) in roles, "binds a role not shipped here"
            assert obj["subjects"] == [
                {"kind": "ServiceAccount", "name": "reloader", "namespace": "reloader"}
            ]


def test_every_workload_kind_is_watched_and_patched() -> None:
    """A new row in ``model.KINDS`` needs its RBAC too."""
    have = permissions.needed(permissions.CLUSTER_ROLE)
    for kind in KINDS.values():
        for verb in ("list", "watch", "patch"):
            assert Permission(kind.resource.group, kind.resource.plural, verb) in have


def test_key_secret_name_is_the_settings_default() -> None:
    assert Settings.model_fields["hash_key_secret"].default == permissions.KEY_SECRET


# --- RBAC: the controller running as its ServiceAccount ------------------------------------------


def forbidden(api: Api) -> dict[tuple[str, str], int]:
    return {key: n for key, n in api.statistics().requests.items() if key[1] == "403"}


@contextlib.asynccontextmanager
async def installed(objects: list[Manifest], *, kubeconfig: Path) -> AsyncIterator[list[Manifest]]:
    """Apply the RBAC part of an install; delete it afterwards (cluster-scoped objects too)."""
    chosen = [o for o in objects if o["kind"] in INSTALLED_KINDS]
    manifest = yaml.safe_dump_all(chosen)
    try:
        await kubectl("apply", "-f", "-", stdin=manifest, kubeconfig=kubeconfig)
        yield chosen
    finally:
        delete = ("delete", "--ignore-not-found", "--wait=false", "-f", "-")
        await kubectl(*delete, stdin=manifest, kubeconfig=kubeconfig)


def with_token(kubeconfig: Mapping[str, Any], token: str) -> dict[str, Any]:
    """The same server and CA, authenticated by ``token`` alone."""
    result = copy.deepcopy(dict(kubeconfig))
    context = next(c for c in result["contexts"] if c["name"] == result["current-context"])
    user = next(u for u in result["users"] if u["name"] == context["context"]["user"])
    user["user"] = {"token": token}
    return result


async def service_account_api(
    admin_api: Api, kubeconfig: Mapping[str, Any], *, namespace: str, name: str
) -> Api:
    """An Api authenticated as the ServiceAccount, with a short-lived TokenRequest token."""
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600},
    }
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
    response: dict[str, Any] = dict(await admin_api.create(path, body))
    return await connect_with_dict(with_token(kubeconfig, response["status"]["token"]))


async def wait_allowed(api: Api, needs: Iterable[Permission], *, namespace: str) -> None:
    """Wait until the server authorises every permission (SelfSubjectAccessReview as ``api``).

    It checks the grants from the server's side, and it waits out the moment between applying
    RBAC and the authorizer seeing it, which would otherwise show up as a spurious 403.
    """
    pending = set(needs)

    async def all_allowed() -> bool:
        for permission in sorted(pending):
            if await allowed(api, permission, namespace=namespace):
                pending.discard(permission)
        return not pending

    with contextlib.suppress(AssertionError):
        await wait_for(all_allowed, timeout=15, message="RBAC in effect")
    assert not pending, (
        f"not allowed in {namespace or 'all namespaces'}: {sorted(map(str, pending))}"
    )


@contextlib.asynccontextmanager
async def running(controller: Controller) -> AsyncIterator[Controller]:
    """Run the controller until the block ends; fail with its 403s if it cannot sync."""
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        await asyncio.wait_for(controller.wait_synced(), timeout=30)
    except TimeoutError:
        task.cancel()  # stopping before the caches sync would wait for them forever
        with contextlib.suppress(asyncio.CancelledError):
            await task
        detail = controller.ready()[1]
        raise AssertionError(f"{detail}; 403s: {forbidden(controller.api)}") from None
    try:
        yield controller
    except AssertionError as error:  # a reload that never came: say whether RBAC refused it
        raise AssertionError(f"{error}; 403s: {forbidden(controller.api)}") from error
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def start_as(api: Api, **overrides: Any) -> Controller:
    """A Controller as app.run builds one, digest key included (no ``hash_key``: the Secret)."""
    settings = Settings(
        debounce_seconds=0.2, min_restart_interval_seconds=0, hash_key=None, **overrides
    )
    key = await asyncio.wait_for(load_digest_key(api, settings), timeout=30)
    return Controller(settings=settings, api=api, digest_key=key)


def web_deployment() -> Manifest:
    """An auto Deployment reading every key of ConfigMap ``app-config``."""
    return deployment(
        "web", annotations=AUTO, containers=[container(**env_from("ConfigMap", "app-config"))]
    )


def cronjob(name: str, *, uses_secret: str) -> Manifest:
    """A CronJob that would run once a year: the only Job in the test is the one we trigger."""
    pod = {"restartPolicy": "Never", "containers": [container(**env_from("Secret", uses_secret))]}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "annotations": dict(AUTO)},
        "spec": {
            "schedule": "0 0 1 1 *",
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": pod}}},
        },
    }


async def wait_cronjob_recorded(scene: Cluster, name: str) -> None:
    path = KINDS["CronJob"].resource.object_path(scene.namespace, name)

    async def recorded() -> bool:
        obj = await scene.api.get(path)
        return RECORD_ANNOTATION in obj.get("metadata", {}).get("annotations", {})

    await wait_for(recorded, message=f"digests recorded on CronJob {name}")


async def wait_job_of(scene: Cluster, cronjob_name: str) -> Manifest:
    async def job() -> Manifest | None:
        page = await scene.api.list_page(JOBS.collection_path(scene.namespace), params=[])
        for item in page.get("items", []):
            owners = item["metadata"].get("ownerReferences", [])
            if [(o["kind"], o["name"]) for o in owners] == [("CronJob", cronjob_name)]:
                return dict(item)
        return None

    return await wait_for(job, message=f"a Job created from CronJob {cronjob_name}")


async def wait_key_secret(admin_api: Api, namespace: str) -> Manifest:
    path = SECRETS.object_path(namespace, permissions.KEY_SECRET)
    secret: Manifest = dict(await admin_api.get(path))
    assert base64.b64decode(secret["data"]["key"]), "an empty digest key"
    return secret


async def test_controller_runs_cluster_wide_as_its_service_account(
    admin_api: Api,
    cluster: TestCluster,
    kubeconfig_file: Path,
    scene: Cluster,
    tmp_path: Path,
) -> None:
    """
    1. Install the cluster-wide overlay's Namespace, ServiceAccount and RBAC under unique names.
    2. Connect with a TokenRequest token of that ServiceAccount; wait until the server authorises
       everything permissions.py lists (SelfSubjectAccessReview as the ServiceAccount).
    3. Load the digest key as a fresh install does: absent, so created in the controller namespace.
    4. Run the controller cluster-wide, with Argo Rollouts on (CRD installed or not, authorisation
       comes first: a missing grant is a 403) and a namespace selector picking this test's
       namespace (so it lists and watches Namespaces too, and acts on nothing else in the cluster).
    5. Change the ConfigMap of an auto Deployment and the Secret of an auto CronJob.
    Result: a second ReplicaSet, a Job owned by the CronJob, Reloaded Events, and not one 403.
    """
    # A letter first: a hex token such as "04e299" is a number to kustomize's YAML parser.
    token = f"x{secrets.token_hex(3)}"
    home = f"reloader-{token}"
    objects = render(customized(tmp_path, "cluster-wide", namespace=home, suffix=f"-{token}"))
    label = f"reloader.test/rbac={token}"
    await admin_api.patch(
        f"/api/v1/namespaces/{scene.namespace}",
        {"metadata": {"labels": {"reloader.test/rbac": token}}},
        patch_type="merge",
    )
    await scene.create_configmap("app-config", {"mode": "a"})
    await scene.create_secret("db", {"password": "one"})
    await scene.create_workload(web_deployment())
    await scene.create_workload(cronjob("nightly", uses_secret="db"))

    async with installed(objects, kubeconfig=kubeconfig_file):
        account = find(objects, "ServiceAccount")["metadata"]["name"]
        api = await service_account_api(admin_api, cluster.kubeconfig, namespace=home, name=account)
        try:
            await wait_allowed(api, permissions.needed(permissions.CLUSTER_ROLE), namespace="")
            await wait_allowed(api, permissions.needed(permissions.KEY_ROLE), namespace=home)
            controller = await start_as(
                api,
                controller_namespace=home,
                namespace_selector=[label],
                is_argo_rollouts=True,
            )
            await wait_key_secret(admin_api, home)
            async with running(controller):
                await scene.wait_recorded("web")
                await wait_cronjob_recorded(scene, "nightly")
                await scene.patch_configmap("app-config", {"data": {"mode": "b"}})
                await scene.set_secret("db", {"password": "two"})
                await scene.wait_replica_sets("web", 2)
                job = await wait_job_of(scene, "nightly")
                await wait_for(lambda: scene.events("Reloaded"), message="Reloaded events")
            assert job["metadata"]["ownerReferences"][0]["controller"] is True
            assert not forbidden(api), f"the ServiceAccount was refused: {forbidden(api)}"
            assert "Rollout" in controller.workloads  # listed: 200 or 404 (no CRD), never 403
        finally:
            await api.close()


async def test_controller_runs_in_one_namespace_as_its_service_account(
    admin_api: Api, cluster: TestCluster, kubeconfig_file: Path, scene: Cluster, tmp_path: Path
) -> None:
    """
    1. Install the namespaced overlay's ServiceAccount and Roles into this test's namespace.
    2. Connect as that ServiceAccount; wait until its Roles are in effect.
    3. Load the digest key (created in this namespace) and run the controller on this namespace.
    4. Change the ConfigMap of an auto Deployment.
    Result: a second ReplicaSet without one 403; Secrets of any other namespace are refused.
    """
    objects = render(customized(tmp_path, "namespaced", namespace=scene.namespace))
    await scene.create_configmap("app-config", {"mode": "a"})
    await scene.create_workload(web_deployment())

    async with installed(objects, kubeconfig=kubeconfig_file):
        api = await service_account_api(
            admin_api, cluster.kubeconfig, namespace=scene.namespace, name="reloader"
        )
        try:
            needs = permissions.needed((*permissions.NAMESPACED_ROLE, *permissions.KEY_ROLE))
            await wait_allowed(api, needs, namespace=scene.namespace)
            controller = await start_as(
                api, namespaces=[scene.namespace], controller_namespace=scene.namespace
            )
            await wait_key_secret(admin_api, scene.namespace)
            async with running(controller):
                await scene.wait_recorded("web")
                await scene.patch_configmap("app-config", {"data": {"mode": "b"}})
                await scene.wait_replica_sets("web", 2)
            assert not forbidden(api), f"the ServiceAccount was refused: {forbidden(api)}"

            for elsewhere in ("default", None):
                with pytest.raises(ApiForbidden):
                    await api.list_page(SECRETS.collection_path(elsewhere), params=[])
        finally:
            await api.close()


# --- RBAC: Jobs owned by a CronJob under OwnerReferencesPermissionEnforcement ---------------------


@pytest.fixture(scope="module")
def enforcing_plane(cluster: TestCluster) -> Iterator[ControlPlane]:
    """A second, private apiserver with the admission plugin OpenShift enables (no controller
    manager: a Job object is all this needs)."""
    if cluster.backend != "local":
        pytest.skip("needs its own apiserver flags: local backend only")
    plugin = "--enable-admission-plugins=OwnerReferencesPermissionEnforcement"
    with ControlPlane(controller_manager=False, extra_apiserver_args=[plugin]) as plane:
        yield plane


async def test_cronjob_trigger_needs_and_has_finalizers_rights_under_owner_enforcement(
    enforcing_plane: ControlPlane,
) -> None:
    """
    1. On an apiserver enforcing owner-reference permissions, install the cluster-wide RBAC minus
       its ``cronjobs/finalizers`` rule: creating a CronJob's Job as the ServiceAccount is refused.
    2. Put the rule back (the RBAC as shipped) and run the controller as the ServiceAccount; change
       the Secret of an auto CronJob.
    Result: the controller creates the Job without one 403: the rule is needed, and enough.
    """
    plane = enforcing_plane
    kubeconfig = plane.kubeconfig_path
    objects = render(MANIFESTS / "overlays" / "cluster-wide")
    without = copy.deepcopy(objects)
    rules = find(without, "ClusterRole")["rules"]
    rules[:] = [r for r in rules if "cronjobs/finalizers" not in r["resources"]]
    needs = permissions.needed(permissions.CLUSTER_ROLE)
    finalizers = {p for p in needs if p.resource == "cronjobs/finalizers"}
    admin = await connect_with_dict(plane.kubeconfig)
    namespace = f"t-owner-{secrets.token_hex(3)}"
    try:
        await admin.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
        scene = Cluster(api=admin, namespace=namespace)
        await scene.create_secret("db", {"password": "one"})
        await scene.create_workload(cronjob("nightly", uses_secret="db"))
        cronjob_path = KINDS["CronJob"].resource.object_path(namespace, "nightly")
        owner: Manifest = dict(await admin.get(cronjob_path))

        # The plane has no controller manager, so nothing would ever finish deleting a namespace:
        # install once, and put the rule back by applying the shipped objects over it.
        async with installed(without, kubeconfig=kubeconfig):
            api = await service_account_api(
                admin, plane.kubeconfig, namespace="reloader", name="reloader"
            )
            try:
                await wait_allowed(api, needs - finalizers, namespace="")
                with pytest.raises(ApiForbidden, match="blockOwnerDeletion"):
                    await api.create(JOBS.collection_path(namespace), _owned_job(owner))
            finally:
                await api.close()

            shipped = [o for o in objects if o["kind"] in INSTALLED_KINDS]
            manifest = yaml.safe_dump_all(shipped)
            await kubectl("apply", "-f", "-", stdin=manifest, kubeconfig=kubeconfig)
            api = await service_account_api(
                admin, plane.kubeconfig, namespace="reloader", name="reloader"
            )
            try:
                await wait_allowed(api, needs, namespace="")
                controller = await start_as(api, controller_namespace="reloader")
                async with running(controller):
                    await wait_cronjob_recorded(scene, "nightly")
                    await scene.set_secret("db", {"password": "two"})
                    await wait_job_of(scene, "nightly")
                assert not forbidden(api), f"the ServiceAccount was refused: {forbidden(api)}"
            finally:
                await api.close()
    finally:
        await admin.close()


def _owned_job(owner: Mapping[str, Any]) -> Manifest:
    """A Job pointing at ``owner`` the way the controller's CronJob trigger does."""
    metadata = owner["metadata"]
    reference = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    template = owner["spec"]["jobTemplate"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "probe-", "ownerReferences": [reference]},
        "spec": template["spec"],
    }
