"""``make demo``: the whole loop on a local control plane, as a user would see it.

1. Start etcd, kube-apiserver and kube-controller-manager (built from Go modules, cached).
2. Run the real ``reloader`` process against it (the console script, out of cluster).
3. Create a ConfigMap and a Deployment annotated ``reloader.stakater.com/auto: "true"`` that mounts
   it; the controller records the ConfigMap's digest (no restart on opt-in).
4. Edit the ConfigMap; the controller patches the pod template and the Deployment controller
   creates a new ReplicaSet. Print both ReplicaSets, the restart marker and the Event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

from reloader.kube import Api, connect_with_dict
from reloader.model import CONFIGMAPS, EVENTS, KINDS, LAST_RELOADED_FROM, NAMESPACES
from tests.controlplane.envtest import ControlPlane, free_port, http_ok
from tests.scenario import container, deployment, wait_for

NAMESPACE = "demo"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


async def replica_sets(api: Api) -> list[dict[str, Any]]:
    page = await api.list_page(f"/apis/apps/v1/namespaces/{NAMESPACE}/replicasets", params=[])
    return sorted(page.get("items", []), key=lambda rs: rs["metadata"]["creationTimestamp"])


async def show_replica_sets(api: Api) -> None:
    for rs in await replica_sets(api):
        meta = rs["metadata"]
        print(f"    ReplicaSet {meta['name']}  created {meta['creationTimestamp']}")


def start_controller(plane: ControlPlane, port: int) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "reloader",
        f"--kubeconfig={plane.kubeconfig_path}",
        f"--metrics-port={port}",
        "--metrics-address=127.0.0.1",
        "--log-format=text",
    ]
    env = {**os.environ, "RELOADER_CONTROLLER_NAMESPACE": "reloader"}
    return subprocess.Popen(argv, env=env)


async def wait_ready(port: int) -> None:
    async def ready() -> bool:
        return await asyncio.to_thread(http_ok, f"http://127.0.0.1:{port}/readyz")

    await wait_for(ready, timeout=60, message="controller /readyz")


async def demo(plane: ControlPlane) -> None:
    api = await connect_with_dict(plane.kubeconfig)
    try:
        for name in ("reloader", NAMESPACE):
            await api.create(NAMESPACES.collection_path(None), {"metadata": {"name": name}})
        port = free_port()
        say("starting the reloader controller (out of cluster, against the local API server)")
        controller = start_controller(plane, port)
        try:
            await wait_ready(port)
            await scenario(api, port)
        finally:
            controller.send_signal(signal.SIGTERM)
            code = controller.wait(30)
            say(f"controller stopped on SIGTERM with exit code {code}")
    finally:
        await api.close()


async def scenario(api: Api, port: int) -> None:
    say("creating ConfigMap demo-config and Deployment web (auto: true, mounts the ConfigMap)")
    await api.create(
        CONFIGMAPS.collection_path(NAMESPACE),
        {"metadata": {"name": "demo-config"}, "data": {"greeting": "hello"}},
    )
    web = deployment(
        "web",
        annotations={"reloader.stakater.com/auto": "true"},
        containers=[container(volumeMounts=[{"name": "config", "mountPath": "/etc/demo"}])],
        volumes=[{"name": "config", "configMap": {"name": "demo-config"}}],
    )
    await api.create(KINDS["Deployment"].resource.collection_path(NAMESPACE), web)

    async def one_replica_set() -> bool:
        return len(await replica_sets(api)) == 1

    await wait_for(one_replica_set, message="the first ReplicaSet")
    await asyncio.sleep(2)  # the controller records the digest; no restart on opt-in
    await show_replica_sets(api)

    say("editing the ConfigMap: greeting=hello -> greeting=bonjour")
    started = time.monotonic()
    await api.patch(
        CONFIGMAPS.object_path(NAMESPACE, "demo-config"),
        {"data": {"greeting": "bonjour"}},
        patch_type="merge",
    )

    async def two_replica_sets() -> bool:
        return len(await replica_sets(api)) == 2

    await wait_for(two_replica_sets, message="a new ReplicaSet after the edit")
    say(f"rolled out {time.monotonic() - started:.1f}s after the edit (debounce window: 1 s):")
    await show_replica_sets(api)
    obj = await api.get(KINDS["Deployment"].resource.object_path(NAMESPACE, "web"))
    marker = obj["spec"]["template"]["metadata"]["annotations"][LAST_RELOADED_FROM]
    print(f"    {LAST_RELOADED_FROM}: {marker}")
    events = await api.list_page(EVENTS.collection_path(NAMESPACE), params=[])
    for event in events.get("items", []):
        if event.get("reason") == "Reloaded":
            print(f"    Event {event['reason']}: {event['message']}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        lines = response.read().decode().splitlines()
    say("metrics (excerpt):")
    for line in lines:
        if line.startswith("reloader_reload_executed_total"):
            print(f"    {line}")


def main() -> None:
    say("starting a local control plane (etcd, kube-apiserver, kube-controller-manager)")
    with ControlPlane() as plane:
        print(f"    API server {plane.url}")
        asyncio.run(demo(plane))
    say("done. To explore by hand: python -m tests.controlplane.envtest (prints a KUBECONFIG)")


if __name__ == "__main__":
    main()
