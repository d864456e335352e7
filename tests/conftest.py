"""Fixtures: one real Kubernetes API server per session, one fresh namespace per test.

``RELOADER_TEST_CLUSTER`` picks the backend:

- ``local`` (default): etcd + kube-apiserver + kube-controller-manager built from Go modules and
  started here (``tests/controlplane``). Works without Docker; this is what CI runs.
- ``k3s``: testcontainers' K3SContainer, where a Docker engine is available.
- ``existing``: the current kubeconfig (``KUBECONFIG`` or ``~/.kube/config``); tests only create
  and delete their own namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from reloader.kube import Api, ApiNotFound, connect_with_dict
from reloader.model import NAMESPACES
from tests.controlplane.envtest import ControlPlane
from tests.scenario import Cluster, scenario


@dataclass
class TestCluster:
    """What tests may know of the backend: an admin kubeconfig and, locally, the processes."""

    backend: str
    kubeconfig: dict[str, Any]
    plane: ControlPlane | None = None

    __test__ = False  # not a test class, despite the name


def _existing_kubeconfig() -> dict[str, Any]:
    path = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]).expanduser()
    return dict(yaml.safe_load(path.read_text()))


@pytest.fixture(scope="session")
def cluster() -> Iterator[TestCluster]:
    backend = os.environ.get("RELOADER_TEST_CLUSTER", "local")
    if backend == "local":
        with ControlPlane() as plane:
            yield TestCluster(backend, plane.kubeconfig, plane)
    elif backend == "k3s":
        try:
            from testcontainers.community.k3s import K3SContainer
        except ImportError:  # testcontainers before the community/ move
            from testcontainers.k3s import K3SContainer

        with K3SContainer() as k3s:
            yield TestCluster(backend, dict(yaml.safe_load(k3s.config_yaml())))
    elif backend == "existing":
        yield TestCluster(backend, _existing_kubeconfig())
    else:
        raise pytest.UsageError(f"RELOADER_TEST_CLUSTER={backend!r}: use local, k3s or existing")


@pytest.fixture(scope="session")
async def admin_api(cluster: TestCluster) -> AsyncIterator[Api]:
    api = await connect_with_dict(cluster.kubeconfig)
    yield api
    await api.close()


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{secrets.token_hex(3)}"


@pytest.fixture
async def namespace(admin_api: Api, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A namespace of the test's own, deleted (without waiting) afterwards."""
    name = _namespace_name(request.node.name)
    await admin_api.create(NAMESPACES.collection_path(None), {"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiNotFound):
        await admin_api.delete(f"{NAMESPACES.collection_path(None)}/{name}")


@pytest.fixture
async def scene(admin_api: Api, namespace: str) -> AsyncIterator[Cluster]:
    async with scenario(admin_api, namespace) as cluster:
        yield cluster
