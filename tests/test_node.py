"""The controller as a Pod on a real node: the image built from the Containerfile, the manifests
applied with ``kubectl apply -k``, applications whose Pods really restart.

Everything else runs the controller out of cluster. Here a kubelet with containerd and runc
(``tests/node``) runs the image that ``images.sh`` builds with buildah from the Containerfile,
so what only a cluster exercises is exercised: the probes, the securityContext (non-root,
read-only root filesystem), in-cluster configuration through the ``kubernetes`` Service with the
ServiceAccount's token, the runbook's ``kubectl logs``, ``/metrics`` through the Service, and an
application process that reads the new Secret value after its rollout.

Evidence comes from the server: ReplicaSets and generations count rollouts, the application's
own log says which value a Pod started with, and the audit log says which requests the
controller's ServiceAccount made and from which Pod address.

Slow by nature (each rollout starts real containers): one node for the module, the namespaced
install first, then the cluster-wide one for the remaining tests.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.node.node import Node, running_node
from tests.node.workloads import (
    app_pods,
    apply,
    controller_ready,
    create_namespace,
    deploy_app,
    install,
    rollouts,
    secret,
    started_with,
    uninstall,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.node]

QUIET = 12.0
"""Seconds a negative check waits: the controller's debounce (1 s) and a rollout's start fit."""


# --- helpers ------------------------------------------------------------------------------------


def rotate_and_expect_one_rollout(node: Node, namespace: str, token: str) -> None:
    """Change the Secret; a new Pod starts with the new value, the old one goes, once."""
    (old,) = [p["metadata"]["name"] for p in app_pods(node, namespace)]
    assert rollouts(node, namespace) == (1, "1")
    apply(node, secret(namespace, token))
    wait_for(
        lambda: started_with(node, namespace) == token,
        message=f"an app Pod in {namespace} that started with the new Secret value {token}",
    )
    wait_for(
        lambda: old not in [p["metadata"]["name"] for p in app_pods(node, namespace)],
        message=f"the old app Pod {old} gone",
    )
    time.sleep(QUIET)  # a second rollout would have started by now
    assert rollouts(node, namespace) == (2, "2")
    assert started_with(node, namespace) == token


def sa_user(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:reloader"


def delete_namespace(node: Node, name: str) -> None:
    node.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node() as started:
        yield started


@pytest.fixture(scope="module")
def cluster_wide(node: Node) -> Iterator[dict[str, Any]]:
    """The default install, ``manifests/overlays/cluster-wide``; yields the controller Pod."""
    directory = install(node, "cluster-wide")
    yield controller_ready(node, "reloader")
    uninstall(node, directory)


# --- tests --------------------------------------------------------------------------------------


def test_namespaced_overlay_restarts_its_namespace_and_touches_nothing_else(node: Node) -> None:
    """The namespaced overlay installed beside an application: a Secret rotated in another
    namespace restarts nothing there (checked first, alone, after a quiet period), one rotated in
    its own namespace restarts the application once; the ServiceAccount's every request named
    its own namespace."""
    mine = create_namespace(node, "tenant-a")
    other = create_namespace(node, "tenant-b")
    directory = install(node, "namespaced", namespace=mine)
    try:
        deploy_app(node, mine)
        deploy_app(node, other)
        apply(node, secret(other, "v2"))
        time.sleep(QUIET)
        assert rollouts(node, other) == (1, "1")
        assert started_with(node, other) == "v1"
        rotate_and_expect_one_rollout(node, mine, "v2")  # and so the controller was alive
        events = node.plane.audit_events(sa_user(mine))
        assert events, "the controller made no request with its ServiceAccount token"
        elsewhere = [
            e
            for e in events
            if "objectRef" in e  # not discovery (/api, /apis, /version)
            and e["objectRef"].get("namespace") != mine
            and e["objectRef"].get("apiGroup") != "authorization.k8s.io"  # self-reviews
        ]
        assert not elsewhere, [(e["verb"], e["requestURI"]) for e in elsewhere]
    finally:
        uninstall(node, directory)
        delete_namespace(node, mine)
        delete_namespace(node, other)


def test_cluster_wide_controller_pod_is_ready_hardened_and_in_cluster(
    node: Node, cluster_wide: dict[str, Any]
) -> None:
    """Ready through its probes; the process is uid 65532 on a read-only root filesystem; it
    talks to the apiserver with its ServiceAccount token from its Pod address; its logs are JSON;
    ``/metrics`` answers through the Service."""
    pod = cluster_wide
    name = pod["metadata"]["name"]
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0
    assert pod["spec"]["nodeName"] == "reloader-node"
    assert not any("kubeconfig" in a for a in pod["spec"]["containers"][0].get("args", []))

    def run(code: str) -> Any:
        return node.kubectl(
            "exec", "-n", "reloader", name, "--", "python3", "-c", code, check=False
        )

    assert run("import os; print(os.getuid(), os.getgid())").stdout.split() == ["65532", "65532"]
    write = run("open('/probe', 'w')")
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    token = run("print(open('/var/run/secrets/kubernetes.io/serviceaccount/token').read())")
    assert token.returncode == 0 and token.stdout.count(".") == 2  # a JWT

    events = node.plane.audit_events(sa_user("reloader"))
    assert {"list", "watch"} <= {e["verb"] for e in events}
    assert {e["sourceIPs"][0] for e in events} == {pod["status"]["podIP"]}

    logs = node.kubectl("logs", "-n", "reloader", "-l", "app=reloader").stdout.splitlines()
    assert logs
    assert all(isinstance(json.loads(line), dict) for line in logs), logs[:5]

    metrics = node.kubectl(
        "get",
        "--raw",
        "/api/v1/namespaces/reloader/services/reloader-metrics:metrics/proxy/metrics",
    ).stdout
    assert "# TYPE reloader_" in metrics


@pytest.mark.parametrize("on_template", [False, True], ids=["metadata", "pod-template"])
def test_rotated_secret_restarts_the_application_once_with_the_new_value(
    node: Node, cluster_wide: dict[str, Any], on_template: bool
) -> None:
    namespace = create_namespace(node, f"app-{'template' if on_template else 'metadata'}")
    try:
        deploy_app(node, namespace, on_template=on_template)
        rotate_and_expect_one_rollout(node, namespace, "v2")
    finally:
        delete_namespace(node, namespace)


def test_replacement_controller_pod_reloads_a_change_pending_at_deletion_once(
    node: Node, cluster_wide: dict[str, Any]
) -> None:
    """With a long debounce the change is still waiting in the old Pod's queue when that Pod is
    deleted (a shutdown drops what waits); the replacement finds it from the server and makes
    the one rollout."""
    node.kubectl(
        "set", "env", "deployment/reloader", "-n", "reloader", "RELOADER_DEBOUNCE_SECONDS=30"
    )
    namespace = create_namespace(node, "app-pending")
    try:
        old_controller = controller_ready(node, "reloader")
        deploy_app(node, namespace)
        time.sleep(QUIET)  # the old controller's first writes (its digest record) come before
        changed_at = datetime.datetime.now(datetime.UTC)
        apply(node, secret(namespace, "v2"))
        time.sleep(3)  # delivered to the old controller, which waits 30 s before acting
        assert rollouts(node, namespace) == (1, "1")
        node.kubectl("delete", "pod", "-n", "reloader", old_controller["metadata"]["name"])
        replacement = controller_ready(node, "reloader")
        assert replacement["metadata"]["uid"] != old_controller["metadata"]["uid"]
        wait_for(
            lambda: started_with(node, namespace) == "v2",
            message="an app Pod that started with v2 after the controller Pod was replaced",
        )
        time.sleep(QUIET)
        assert rollouts(node, namespace) == (2, "2")
        patches = [
            e
            for e in node.plane.audit_events(sa_user("reloader"))
            if e["verb"] == "patch"
            and datetime.datetime.fromisoformat(e["requestReceivedTimestamp"]) >= changed_at
            and e.get("objectRef", {}).get("namespace") == namespace
            and e["objectRef"].get("resource") == "deployments"
        ]
        sources = {e["sourceIPs"][0] for e in patches}
        assert old_controller["status"]["podIP"] not in sources
        assert replacement["status"]["podIP"] in sources
    finally:
        delete_namespace(node, namespace)
        node.kubectl(
            "set", "env", "deployment/reloader", "-n", "reloader", "RELOADER_DEBOUNCE_SECONDS-"
        )
