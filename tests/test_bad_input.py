"""Unusual and bad input against a real API server: the controller reports it and keeps serving.

Each test applies the input, checks what the controller said about it (a log line, an Event, the
record on the workload), and then proves the controller is still alive and correct with a change
that must restart a workload, made after the bad input was in place and seen.
Hostile annotation values are in ``test_hostile_annotations.py``; generated pod specs and
annotation maps in ``test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from reloader.annotations import DEFAULT_NAMES
from reloader.kube import Api, ApiInvalid, ApiNotFound
from reloader.model import CONFIGMAPS, NAMESPACES, RECORD_ANNOTATION
from tests.conftest import TestCluster
from tests.scenario import Cluster, container, deployment, env_from, marker_source

pytestmark = pytest.mark.cluster

AUTO = DEFAULT_NAMES.auto
DATA_LIMIT = 1 << 20
"""What the API server accepts in one ConfigMap's values, all keys together (1 MiB; the names of
the keys are not counted)."""


def _largest_data(fill: str) -> dict[str, str]:
    """One key whose value is exactly ``DATA_LIMIT`` bytes."""
    return {"k": fill * DATA_LIMIT}


@pytest.mark.timeout(240)
async def test_large_binary_empty_and_missing_configs_on_a_50_container_workload(
    scene: Cluster,
) -> None:
    """1. ConfigMaps: ``big`` holds the largest data the server accepts (one byte more is
       refused), ``binary`` only binaryData, ``empty`` nothing. A Deployment of 50 containers
       reads them, a ConfigMap and a Secret that do not exist, and names an invalid regex
       beside ``big`` in its named list.
    2. The controller records it: the missing configs as absent; one Warning Event names the
       invalid regex.
    3. ``big``, ``binary`` and ``empty`` change one at a time.
    Result: one restart each (marker naming the config), and an ordinary Deployment beside it
    still restarts on its own config's change.
    """
    with pytest.raises(ApiInvalid):
        await scene.create_configmap("too-big", {"k": "x" * (DATA_LIMIT + 1)})
    await scene.create_configmap("big", _largest_data("a"))
    body = {"metadata": {"name": "binary"}, "binaryData": {"blob": "AAEC/w=="}}
    await scene.api.create(CONFIGMAPS.collection_path(scene.namespace), body)
    await scene.create_configmap("empty", {})
    await scene.create_configmap("plain-config", {"v": "1"})

    missing_secret = {"name": "S", "valueFrom": {"secretKeyRef": {"name": "no-such", "key": "k"}}}
    empty_key = {"name": "E", "valueFrom": {"configMapKeyRef": {"name": "empty", "key": "k"}}}
    optional = {"configMapRef": {"name": "absent", "optional": True}}
    containers = [
        container(f"c{i}", envFrom=[{"configMapRef": {"name": "big"}}, optional]) for i in range(48)
    ]
    containers.append(container("c48", env=[missing_secret, empty_key]))
    containers.append(container("c49", volumeMounts=[{"name": "blob", "mountPath": "/b"}]))
    volumes = [{"name": "blob", "configMap": {"name": "binary"}}]
    annotations = {AUTO: "true", DEFAULT_NAMES.configmap_reload: "big,[unclosed"}
    await scene.create_workload(
        deployment("wide", annotations=annotations, containers=containers, volumes=volumes)
    )
    plain = [container(**env_from("ConfigMap", "plain-config"))]
    await scene.create_workload(deployment("plain", annotations={AUTO: "true"}, containers=plain))
    await scene.start_controller()

    recorded = await scene.wait_recorded("wide")
    configs = json.loads(recorded["metadata"]["annotations"][RECORD_ANNOTATION])["configs"]
    assert configs["ConfigMap/absent"] == "" and configs["Secret/no-such"] == "", configs
    assert all(configs[f"ConfigMap/{name}"] for name in ("big", "binary", "empty")), configs
    warnings = [e for e in await scene.events("InvalidAnnotation") if _about(e, "wide")]
    assert len(warnings) == 1 and "[unclosed" in warnings[0]["message"], warnings

    changes: list[tuple[str, dict[str, Any]]] = [
        ("big", {"data": _largest_data("b")}),
        ("binary", {"binaryData": {"blob": "AAED/w=="}}),
        ("empty", {"data": {"k": "now set"}}),
    ]
    for count, (name, patch) in enumerate(changes, start=2):
        await scene.patch_configmap(name, patch)
        await scene.assert_replica_sets_stay("wide", count)
        marker = await scene.marker("Deployment", "wide")
        assert marker is not None and marker_source(marker) == ("ConfigMap", name)

    await scene.patch_configmap("plain-config", {"data": {"v": "2"}})
    await scene.assert_replica_sets_stay("plain", 2)


def _about(event: dict[str, Any], name: str) -> bool:
    return bool(event["involvedObject"]["name"] == name)


@pytest.fixture
async def unreadable(admin_api: Api, namespace: str) -> AsyncIterator[str]:
    """A second namespace, with a Deployment and its ConfigMap, that the ServiceAccount of the
    test's namespace has no grant in."""
    name = f"{namespace[:50]}-x{secrets.token_hex(2)}"
    await admin_api.create(NAMESPACES.collection_path(None), {"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiNotFound):
        await admin_api.delete(f"{NAMESPACES.collection_path(None)}/{name}")


async def test_a_namespace_the_account_cannot_read_is_reported_and_holds_nothing_up(
    cluster: TestCluster,
    scene: Cluster,
    unreadable: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1. The controller runs as the namespaced overlay's ServiceAccount, told to watch its own
       namespace and one where it has no grant (every list there is answered 403).
    2. A config in its own namespace changes.
    Result: the controller is ready (the unreadable namespace counts as listed and empty
    instead of holding the others up), logs an error naming the namespace and the kind, and
    restarts the workload of its own namespace once.
    """
    other = Cluster(api=scene.api, namespace=unreadable)
    await other.create_configmap("cfg", {"v": "1"})
    await other.create_workload(
        deployment(
            "there",
            annotations={AUTO: "true"},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    await scene.create_configmap("cfg", {"v": "1"})
    await scene.create_workload(
        deployment(
            "here",
            annotations={AUTO: "true"},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    account = await scene.as_service_account(cluster.kubeconfig)
    with caplog.at_level(logging.INFO, logger="reloader"):
        await scene.start_controller(api=account, namespaces=[scene.namespace, unreadable])
        await scene.wait_recorded("here")
        refused = [
            r
            for r in caplog.records
            if r.getMessage().startswith("forbidden to list or watch")
            and getattr(r, "namespace", None) == unreadable
        ]
        assert refused, [r.getMessage() for r in caplog.records]
        assert all(r.levelno == logging.ERROR for r in refused)
        assert RECORD_ANNOTATION not in (
            (await other.get_workload("Deployment", "there"))["metadata"].get("annotations") or {}
        )
        await scene.patch_configmap("cfg", {"data": {"v": "2"}})
        await scene.assert_replica_sets_stay("here", 2)
        marker = await scene.marker("Deployment", "here")
        assert marker is not None and marker_source(marker) == ("ConfigMap", "cfg")
