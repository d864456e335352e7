"""The controller imports kubernetes_asyncio's configuration and session, not its generated API.

``kubernetes_asyncio/__init__.py`` imports every generated API and model class (about 1 s and
33 MiB of RSS here); the controller never uses them. Each check runs in a fresh interpreter, since
this test process has imported the package in full already.
"""

from __future__ import annotations

import subprocess
import sys

GENERATED = ("kubernetes_asyncio.client.api", "kubernetes_asyncio.client.models.v1_pod")


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_controller_does_not_import_the_generated_client() -> None:
    """Fails before the change: ``from kubernetes_asyncio import client`` loaded all of it."""
    code = f"""
import sys
import reloader.app
print(sorted(m for m in {GENERATED!r} if m in sys.modules))
"""
    assert run(code) == "[]"


def test_another_user_of_the_package_still_gets_all_of_it() -> None:
    """A test or tool in the same process that uses the generated client after the controller's
    import gets the real package: the deferred ``__init__`` runs on the first missing name."""
    code = """
import reloader.kube
from kubernetes_asyncio import client, config, watch
import kubernetes_asyncio.client.models as models
assert client.Configuration is reloader.kube.Configuration
print(client.CoreV1Api.__name__, models.V1Pod.__name__, watch.Watch.__name__,
      config.ConfigException is reloader.kube.ConfigException)
"""
    assert run(code) == "CoreV1Api V1Pod Watch True"


def test_loading_a_kubeconfig_works_without_the_generated_client() -> None:
    code = """
import asyncio, sys
from reloader.kube import connect_with_dict
kubeconfig = {
    "apiVersion": "v1", "kind": "Config", "current-context": "c",
    "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],
    "users": [{"name": "u", "user": {"token": "t"}}],
    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
}
async def main():
    api = await connect_with_dict(kubeconfig)
    print(api.server, "kubernetes_asyncio.client.api" in sys.modules)
    await api.close()
asyncio.run(main())
"""
    assert run(code) == "https://127.0.0.1:1 False"
