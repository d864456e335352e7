"""What the node tests and ``make demo-cluster`` do with kubectl on the node's control plane:
install an overlay with the locally built image, deploy the application, read what its Pods
started with, count rollouts. Synchronous on purpose: every step is one kubectl call, as in the
runbook.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.node.node import Node

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER_IMAGE = "ghcr.io/example/reloader"
ROLLOUT = 120.0
"""Seconds to wait for a rollout: real containers start, on a machine shared with other work."""


def wait_for(probe: Callable[[], T | None], *, timeout: float = ROLLOUT, message: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.5)


def get(node: Node, *args: str) -> Any:
    return json.loads(node.kubectl("get", *args, "-o", "json").stdout)


def apply(node: Node, *objects: dict[str, Any]) -> None:
    node.kubectl("apply", "-f", "-", stdin="\n---\n".join(yaml.safe_dump(o) for o in objects))


def install(node: Node, overlay: str, *, namespace: str | None = None) -> Path:
    """``kubectl apply -k`` of a kustomization over ``manifests/overlays/<overlay>`` that only
    points the image at the one built locally (and moves it into ``namespace``), as a user's
    own overlay would; returns its directory, for ``uninstall``."""
    name, _, tag = node.images.controller.rpartition(":")
    directory = Path(tempfile.mkdtemp(prefix=f"reloader-overlay-{overlay}-"))
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # kustomize takes relative paths only; a directory resource may be anywhere.
        "resources": [os.path.relpath(ROOT / "manifests" / "overlays" / overlay, directory)],
        "images": [{"name": PLACEHOLDER_IMAGE, "newName": name, "newTag": tag}],
    }
    if namespace is not None:
        kustomization["namespace"] = namespace
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    node.kubectl("apply", "-k", str(directory))
    controller_ready(node, namespace or "reloader")
    return directory


def uninstall(node: Node, directory: Path) -> None:
    node.kubectl("delete", "-k", str(directory), "--ignore-not-found", "--wait=true")


def controller_ready(node: Node, namespace: str) -> dict[str, Any]:
    """Wait for the controller's rollout and return its one Pod, Ready through its probes."""
    node.kubectl(
        "rollout", "status", "deployment/reloader", "-n", namespace, f"--timeout={ROLLOUT:.0f}s"
    )
    return wait_for(
        lambda: _one_ready_pod(node, namespace, "app=reloader"),
        message=f"one Ready controller Pod in {namespace}",
    )


def _one_ready_pod(node: Node, namespace: str, selector: str) -> dict[str, Any] | None:
    pods = [
        p
        for p in get(node, "pods", "-n", namespace, "-l", selector)["items"]
        if "deletionTimestamp" not in p["metadata"]
    ]
    if len(pods) != 1:
        return None
    conditions = pods[0]["status"].get("conditions") or []
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return pods[0] if ready else None


def create_namespace(node: Node, name: str) -> str:
    apply(node, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(
        lambda: (
            node.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode
            == 0
        ),
        message=f"the default ServiceAccount in {name}",
    )
    return name


def deploy_app(node: Node, namespace: str, *, on_template: bool = False) -> None:
    """The application: a Secret through ``envFrom``, a ConfigMap through a volume, and the auto
    annotation on the Deployment's metadata or, with ``on_template``, on its pod template only."""
    auto = {"reloader.stakater.com/auto": "true"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": {"runAsNonRoot": True},
                    "containers": [
                        {
                            "name": "app",
                            "image": node.images.app,
                            "imagePullPolicy": "Never",
                            "envFrom": [{"secretRef": {"name": "app-secret"}}],
                            "volumeMounts": [{"name": "config", "mountPath": "/config"}],
                        }
                    ],
                    "volumes": [{"name": "config", "configMap": {"name": "app-config"}}],
                },
            },
        },
    }
    if on_template:
        deployment["spec"]["template"]["metadata"]["annotations"] = auto  # type: ignore[index]
    else:
        deployment["metadata"]["annotations"] = auto  # type: ignore[index]
    apply(
        node,
        secret(namespace, "v1"),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app-config", "namespace": namespace},
            "data": {"greeting": "hello"},
        },
        deployment,
    )
    node.kubectl(
        "rollout", "status", "deployment/app", "-n", namespace, f"--timeout={ROLLOUT:.0f}s"
    )
    wait_for(lambda: started_with(node, namespace) == "v1", message="the app started with v1")


def secret(namespace: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "app-secret", "namespace": namespace},
        "stringData": {"TOKEN": token},
    }


def app_pods(node: Node, namespace: str) -> list[dict[str, Any]]:
    return list(get(node, "pods", "-n", namespace, "-l", "app=app")["items"])


def started_with(node: Node, namespace: str) -> str | None:
    """The TOKEN the one live application Pod's process started with, from its log."""
    pod = _one_ready_pod(node, namespace, "app=app")
    if pod is None:
        return None
    result = node.kubectl("logs", "-n", namespace, pod["metadata"]["name"], check=False)
    for line in result.stdout.splitlines():
        if line.startswith("started token="):
            return line.removeprefix("started token=")
    return None


def rollouts(node: Node, namespace: str) -> tuple[int, str]:
    """(ReplicaSets of the app, the Deployment's revision): (1, "1") before any restart.

    Not the generation: a Deployment's goes up with its annotations too, and the controller
    records digests there without a rollout.
    """
    replica_sets = get(node, "replicasets", "-n", namespace, "-l", "app=app")["items"]
    annotations = get(node, "deployment", "app", "-n", namespace)["metadata"]["annotations"]
    return len(replica_sets), str(annotations.get("deployment.kubernetes.io/revision"))
