"""Stakater's Helm chart with only the image swapped: the process as that chart runs it.

The facts below are what Stakater's chart (v2.2.16) renders with its default values, taken from
../shared/notes/stakater-reloader.md §3 and §1.5, not from the chart itself:

- args: ``--log-level=info`` only; with ``reloader.namespaceSelector`` set, also
  ``--namespace-selector="<selector>"`` with the double quotes inside the argument;
- env: ``GOMAXPROCS`` and ``GOMEMLIMIT`` (from the limits), ``RELOADER_NAMESPACE`` (the pod's
  namespace) and ``RELOADER_DEPLOYMENT_NAME`` (``<release>-reloader``); the kubelet adds
  ``KUBERNETES_SERVICE_HOST``/``PORT``;
- RBAC: the ClusterRole below (no ``watch`` on workloads, no ``create`` on Secrets), plus a Role
  ``<fullname>-metadata-role`` on ConfigMaps in the release namespace for the meta-info ConfigMap;
- probes: liveness ``GET /live``, readiness ``GET /metrics``, both on port 9090.

Two deviations, both forced by the test bed: the chart's default is to watch every namespace, and
the control plane is shared with other tests, so the chart's ``namespaceSelector`` value is set
(which is also the quoted-argument case); and the port is a free one, not 9090. The pod's mounted
token is a TokenRequest token in a kubeconfig passed with ``--kubeconfig``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from reloader.app import load_digest_key
from reloader.digests import DigestKey
from reloader.kube import Api, ApiNotFound
from reloader.model import CONFIGMAPS, NAMESPACES, SECRETS
from reloader.settings import Settings, load_settings
from tests.conftest import TestCluster
from tests.controlplane.envtest import free_port
from tests.scenario import Cluster, container, deployment, env_from, wait_for, with_token

RBAC = "/apis/rbac.authorization.k8s.io/v1"
INSTALL_DOC = Path(__file__).resolve().parents[1] / "docs" / "install.md"
FULLNAME = "reloader-reloader"
"""The chart's ``<release>-reloader`` for release ``reloader``."""


def chart_cluster_role_rules(*, namespace_selector: bool) -> list[dict[str, Any]]:
    """The chart's ClusterRole with default values (notes §3.2), no Argo, no OpenShift, no HA."""
    rules: list[dict[str, Any]] = [
        {
            "apiGroups": [""],
            "resources": ["secrets", "configmaps"],
            "verbs": ["list", "get", "watch"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments", "daemonsets", "statefulsets"],
            "verbs": ["list", "get", "update", "patch"],
        },
        {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["list", "get"]},
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["create", "delete", "list", "get"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    if namespace_selector:
        namespaces = {
            "apiGroups": [""],
            "resources": ["namespaces"],
            "verbs": ["get", "list", "watch"],
        }
        rules.append(namespaces)
    return rules


METADATA_ROLE_RULES = [
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["list", "get", "watch", "create", "update"],
    }
]


# --- pure: quoted list values and the key file ---------------------------------------------------


def test_quoted_list_values_lose_one_pair_of_quotes_as_in_stakater() -> None:
    """Stakater's list flags are CSV records: the chart's ``--namespace-selector="team=a"`` means
    ``team=a``. Before, the quotes stayed and the selector was refused (exit 2)."""
    settings = load_settings(
        [
            '--namespace-selector="team=a"',
            '--resource-label-selector="app in (a,b)",tier=web',
            '--namespaces-to-ignore="kube-system","kube-public"',
            '--resources-to-ignore="secrets"',
        ]
    )
    assert settings.namespace_selector == ["team=a"]
    assert settings.config_label_selector == "app in (a,b),tier=web"
    assert settings.namespaces_to_ignore == ["kube-public", "kube-system"]
    assert settings.resources_to_ignore == ["secrets"]


async def test_the_digest_key_file_is_read_as_bytes(tmp_path: Path) -> None:
    """A Secret key mounted as a file gives the same key as the Secret read from the API."""
    raw = DigestKey.generate_secret()
    path = tmp_path / "key"
    path.write_bytes(raw)
    settings = Settings(hash_key=None, hash_key_file=str(path))
    key = await load_digest_key(cast(Api, None), settings)  # a key file needs no API
    assert key.key_id == DigestKey.from_secret(raw).key_id


# --- the process, as the chart runs it -----------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


async def http_get(port: int, path: str, *, host: str = "127.0.0.1") -> tuple[int, str]:
    netloc = f"[{host}]" if ":" in host else host
    return await asyncio.to_thread(_get, f"http://{netloc}:{port}{path}")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.asynccontextmanager
async def chart_rbac(admin_api: Api, *, home: str, token: str) -> AsyncIterator[None]:
    """The chart's ServiceAccount, ClusterRole(Binding) and metadata Role(Binding) in ``home``."""
    cluster_name = f"{FULLNAME}-role-{token}"
    subject = [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": home}]
    await admin_api.create(NAMESPACES.collection_path(None), {"metadata": {"name": home}})
    await admin_api.create(
        f"/api/v1/namespaces/{home}/serviceaccounts", {"metadata": {"name": FULLNAME}}
    )
    rules = chart_cluster_role_rules(namespace_selector=True)
    await admin_api.create(
        f"{RBAC}/clusterroles", {"metadata": {"name": cluster_name}, "rules": rules}
    )
    await admin_api.create(
        f"{RBAC}/clusterrolebindings",
        {
            "metadata": {"name": cluster_name},
            "roleRef": _role_ref("ClusterRole", cluster_name),
            "subjects": subject,
        },
    )
    role = f"{FULLNAME}-metadata-role"
    await admin_api.create(
        f"{RBAC}/namespaces/{home}/roles",
        {"metadata": {"name": role}, "rules": METADATA_ROLE_RULES},
    )
    await admin_api.create(
        f"{RBAC}/namespaces/{home}/rolebindings",
        {"metadata": {"name": role}, "roleRef": _role_ref("Role", role), "subjects": subject},
    )
    try:
        yield
    finally:
        for path in (
            f"{RBAC}/clusterrolebindings/{cluster_name}",
            f"{RBAC}/clusterroles/{cluster_name}",
            f"/api/v1/namespaces/{home}",
        ):
            with contextlib.suppress(ApiNotFound):
                await admin_api.delete(path)


def _role_ref(kind: str, name: str) -> dict[str, str]:
    return {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}


def documented_addon(*, home: str, token: str) -> list[dict[str, Any]]:
    """The RBAC add-on docs/install.md tells chart users to apply, for this test's install."""
    text = INSTALL_DOC.read_text()
    block = re.search(
        r"<!-- stakater-chart-addon:start -->\n```yaml\n(.*?)```\n<!-- stakater-chart-addon:end",
        text,
        re.S,
    )
    assert block, "docs/install.md lost its stakater-chart-addon block"
    objects = [o for o in yaml.safe_load_all(block.group(1)) if o]
    for obj in objects:
        if obj["kind"].startswith("Cluster"):
            obj["metadata"]["name"] += f"-{token}"
        else:
            obj["metadata"]["namespace"] = home
        if "roleRef" in obj and obj["roleRef"]["kind"] == "ClusterRole":
            obj["roleRef"]["name"] += f"-{token}"
        for subject in obj.get("subjects", []):
            subject["namespace"] = home
    return objects


async def apply_addon(admin_api: Api, objects: list[dict[str, Any]]) -> None:
    plural = {
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "Role": "roles",
        "RoleBinding": "rolebindings",
    }
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        scope = f"/namespaces/{namespace}" if namespace else ""
        await admin_api.create(f"{RBAC}{scope}/{plural[obj['kind']]}", obj)


async def delete_cluster_addon(admin_api: Api, objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            with contextlib.suppress(ApiNotFound):
                path = f"{RBAC}/{obj['kind'].lower()}s/{obj['metadata']['name']}"
                await admin_api.delete(path)


async def service_account_kubeconfig(
    admin_api: Api, cluster: TestCluster, *, home: str, path: Path
) -> Path:
    """What the pod's mounted token gives: a TokenRequest token of the chart's ServiceAccount."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
    answer = await admin_api.create(
        f"/api/v1/namespaces/{home}/serviceaccounts/{FULLNAME}/token", body
    )
    token = answer["status"]["token"]
    text = yaml.safe_dump(with_token(cluster.kubeconfig, token))
    await asyncio.to_thread(path.write_text, text)
    return path


def pod_env(cluster: TestCluster, *, home: str, port: int) -> dict[str, str]:
    """The chart's env, plus what the kubelet adds to every container."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELOADER_", "POD_", "KUBE")) and k != "METRICS_COUNT_BY_NAMESPACE"
    }
    server = urllib.parse.urlsplit(_server(cluster))
    env.update(
        GOMAXPROCS="2",
        GOMEMLIMIT="536870912",
        RELOADER_NAMESPACE=home,
        RELOADER_DEPLOYMENT_NAME=FULLNAME,
        KUBERNETES_SERVICE_HOST=server.hostname or "127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(server.port or 443),
        RELOADER_METRICS_PORT=str(port),  # the test bed's deviation: not 9090
    )
    return env


def _server(cluster: TestCluster) -> str:
    config = cluster.kubeconfig
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    name = context["context"]["cluster"]
    return str(next(c for c in config["clusters"] if c["name"] == name)["cluster"]["server"])


@contextlib.contextmanager
def controller_process(
    argv: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "reloader", *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def wait_readyz(port: int, process: subprocess.Popen[bytes], *, says: str) -> str:
    """Wait until ``/readyz`` answers 503 mentioning ``says``, the process alive and ``/live``
    200 meanwhile: not ready, and no reason for the kubelet to restart it."""

    async def answer() -> str | None:
        assert process.poll() is None, f"the controller exited with {process.returncode}"
        status, text = await http_get(port, "/readyz")
        if status != 503 or says not in text:
            return None
        assert (await http_get(port, "/live"))[0] == 200, "not ready must not mean not alive"
        return text

    return await wait_for(answer, timeout=30, message=f"/readyz 503 saying {says!r}")


async def meta_info(admin_api: Api, home: str) -> dict[str, Any]:
    async def written() -> dict[str, Any] | None:
        path = CONFIGMAPS.object_path(home, "reloader-meta-info")
        obj: dict[str, Any] = dict(await admin_api.get(path))
        return obj if obj["data"].get("buildInfo", "").startswith("{") else None

    return await wait_for(written, message="reloader-meta-info written")


@pytest.mark.cluster
async def test_stakaters_chart_with_our_image_waits_says_what_is_missing_then_reloads(
    admin_api: Api, cluster: TestCluster, scene: Cluster, tmp_path: Path
) -> None:
    """
    1. Install the chart's ServiceAccount and RBAC (namespace selector set: see the module
       docstring); a stale ``reloader-meta-info`` is there, as a Stakater install leaves it.
    2. Run ``python -m reloader`` with the chart's args and env, as that ServiceAccount.
    3. It cannot create the digest key Secret: it stays alive, ``/readyz`` 503 names the grant.
       Before, the 403 ended the process (exit 2): a crash-looping pod.
    4. Create the Secret, as the docs offer: ``/readyz`` now names the missing watch and patch
       grants. Apply the RBAC add-on from docs/install.md: it becomes ready.
    5. A ConfigMap change rolls an auto Deployment (a second ReplicaSet).
    Also: the meta-info ConfigMap replaced as Stakater writes it, ``/live`` and ``/metrics`` on the
    port (IPv4 and IPv6), ``process_*`` series, ``reloader_events_received_total`` with Stakater's
    labels and values, and SIGTERM exits 0.
    """
    token = secrets.token_hex(3)
    home = f"reloader-{token}"
    label = f"reloader.test/chart={token}"
    await admin_api.patch(
        f"/api/v1/namespaces/{scene.namespace}",
        {"metadata": {"labels": {"reloader.test/chart": token}}},
        patch_type="merge",
    )
    await scene.create_configmap("app-config", {"mode": "a"})
    web = deployment(
        "web",
        annotations={"reloader.stakater.com/auto": "true"},
        containers=[container(**env_from("ConfigMap", "app-config"))],
    )
    await scene.create_workload(web)
    addon = documented_addon(home=home, token=token)
    port = free_port()
    log = tmp_path / "reloader.log"

    async with chart_rbac(admin_api, home=home, token=token):
        stale = {"metadata": {"name": "reloader-meta-info"}, "data": {"buildInfo": "stale"}}
        await admin_api.create(CONFIGMAPS.collection_path(home), stale)
        kubeconfig = await service_account_kubeconfig(
            admin_api, cluster, home=home, path=tmp_path / "sa.kubeconfig"
        )
        argv = ["--log-level=info", f'--namespace-selector="{label}"', f"--kubeconfig={kubeconfig}"]
        env = pod_env(cluster, home=home, port=port)
        try:
            with controller_process(argv, env, log) as process:
                text = await wait_readyz(port, process, says="create")
                assert "reloader-hash-key" in text and home in text, text
                assert "--hash-key-file" in text, text

                key = {"metadata": {"name": "reloader-hash-key"}, "stringData": {"key": "k" * 32}}
                await admin_api.create(SECRETS.collection_path(home), key)
                text = await wait_readyz(port, process, says="lacks")
                for grant in (
                    "watch deployments.apps",
                    "patch cronjobs.batch",
                    "delete configmaps",
                ):
                    assert grant in text, text

                await apply_addon(admin_api, addon)
                await wait_for(
                    lambda: _status_is(port, "/readyz", 200), timeout=60, message="ready"
                )
                await scene.wait_recorded("web")
                await scene.patch_configmap("app-config", {"data": {"mode": "b"}})
                await scene.wait_replica_sets("web", 2)

                assert (await http_get(port, "/live"))[0] == 200
                status, metrics = await http_get(port, "/metrics")
                assert status == 200
                if ipv6_loopback():
                    assert (await http_get(port, "/live", host="::1"))[0] == 200, "no IPv6"
                info = await meta_info(admin_api, home)
                assert process.poll() is None
                process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(process.wait, 30)
        except (AssertionError, TimeoutError) as error:
            raise AssertionError(f"{error}\ncontroller log:\n{log.read_text()[-4000:]}") from None
        finally:
            await delete_cluster_addon(admin_api, addon)
    assert code == 0, log.read_text()[-2000:]

    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert series in metrics, f"{series} missing"
    received = re.findall(r"^reloader_events_received_total\{([^}]*)\}", metrics, re.M)
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', item)) for item in received]
    assert {"event_type": "add", "resource_type": "configmaps"} in labels, received
    assert {"event_type": "update", "resource_type": "configmaps"} in labels, received
    assert {"event_type": "add", "resource_type": "namespaces"} in labels, received
    assert {lab["event_type"] for lab in labels} <= {"add", "update", "delete"}, received
    assert {lab["resource_type"] for lab in labels} <= {"configmaps", "secrets", "namespaces"}

    assert info["metadata"]["labels"] == {"reloader.stakater.com/meta-info": "reloader"}
    assert set(info["data"]) == {"buildInfo", "reloaderOptions", "deploymentInfo"}
    build = json.loads(info["data"]["buildInfo"])
    assert set(build) == {"goVersion", "releaseVersion", "commitHash", "commitTime", "edition"}
    options = json.loads(info["data"]["reloaderOptions"])
    assert options["namespaceSelectors"] == [label]  # unquoted, as Stakater records it
    assert options["logLevel"] == "info"
    assert options["reloaderAutoAnnotation"] == "reloader.stakater.com/auto"
    assert json.loads(info["data"]["deploymentInfo"]) == {
        "name": FULLNAME,
        "namespace": home,
        "creationTimestamp": None,
    }


async def _status_is(port: int, path: str, status: int) -> bool:
    return (await http_get(port, path))[0] == status
