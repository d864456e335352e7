"""The latency floor: the least any controller can do, run and measured like a contender.

It watches Deployments, ConfigMaps and Secrets and, on every ConfigMap or Secret MODIFIED event,
patches the pod template of each Deployment whose pod spec names that config, at once and all
concurrently. No digests, no debounce, no queue, no record, no rate limit, no retries: what is left
is what the API server, the watch path and this machine cost by themselves. A real controller's
latency above this floor is its own overhead.

It is also wrong on purpose (a label-only change restarts too, a burst restarts once per event), so
the bench runs it only on scenarios where every event is a data change.

``python -m bench.floor --kubeconfig=PATH --namespaces=a,b --metrics-port=P``; ``/readyz`` answers
200 once the three initial lists are done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web

from reloader.kube import Api, ApiError, connect
from reloader.model import CONFIGMAPS, KINDS, SECRETS, Resource

DEPLOYMENTS = KINDS["Deployment"].resource
MARKER = "bench.reloader/floor-reloaded-from"
_REFERENCE_FIELDS = {
    "configMapRef": "ConfigMap",
    "configMapKeyRef": "ConfigMap",
    "configMap": "ConfigMap",
    "secretRef": "Secret",
    "secretKeyRef": "Secret",
    "secret": "Secret",
}

ConfigId = tuple[str, str, str]
"""(kind, namespace, name)"""


def referenced(node: Any) -> Iterator[tuple[str, str]]:
    """Every (kind, name) a pod spec mentions, wherever it sits: a walk, not a parser."""
    if isinstance(node, list):
        for item in node:
            yield from referenced(item)
    elif isinstance(node, dict):
        for field, value in node.items():
            kind = _REFERENCE_FIELDS.get(field)
            if kind is not None and isinstance(value, dict):
                name = value.get("name") or value.get("secretName")
                if name:
                    yield kind, str(name)
            yield from referenced(value)


class Floor:
    """Config → dependent Deployments, and the patches."""

    def __init__(self, api: Api, namespaces: frozenset[str]) -> None:
        self.api = api
        self.namespaces = namespaces
        self.users: dict[ConfigId, set[str]] = defaultdict(set)
        self.listed = 0
        self.group: asyncio.TaskGroup | None = None

    def in_scope(self, obj: Mapping[str, Any]) -> bool:
        return not self.namespaces or obj["metadata"].get("namespace") in self.namespaces

    def on_deployment(self, kind: str, obj: Mapping[str, Any]) -> None:
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        template = obj.get("spec", {}).get("template", {}).get("spec", {})
        for config_kind, config in referenced(template):
            if kind == "DELETED":
                self.users[(config_kind, namespace, config)].discard(name)
            else:
                self.users[(config_kind, namespace, config)].add(name)

    def on_config(self, resource: Resource, kind: str, obj: Mapping[str, Any]) -> None:
        if kind != "MODIFIED" or self.group is None:
            return
        metadata = obj["metadata"]
        config: ConfigId = (resource.kind, metadata["namespace"], metadata["name"])
        marker = f"{resource.kind}/{metadata['name']}@{metadata['resourceVersion']}"
        for deployment in list(self.users.get(config, ())):
            self.group.create_task(self.patch(metadata["namespace"], deployment, marker))

    async def patch(self, namespace: str, name: str, marker: str) -> None:
        body = {"spec": {"template": {"metadata": {"annotations": {MARKER: marker}}}}}
        with contextlib.suppress(ApiError):
            await self.api.patch(
                DEPLOYMENTS.object_path(namespace, name), body, patch_type="strategic"
            )

    async def follow(self, resource: Resource) -> None:
        """List, then watch forever (resuming from the last resourceVersion)."""
        page = await self.api.list_page(resource.collection_path(None), params=[])
        for obj in page.get("items", []):
            self.dispatch(resource, "ADDED", obj)
        version = page["metadata"]["resourceVersion"]
        self.listed += 1
        while True:
            params = [("resourceVersion", version), ("allowWatchBookmarks", "true")]
            with contextlib.suppress(ApiError):
                async for event in self.api.watch(
                    resource.collection_path(None), params=params, read_timeout=120
                ):
                    obj = event["object"]
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.dispatch(resource, event["type"], obj)

    def dispatch(self, resource: Resource, kind: str, obj: Mapping[str, Any]) -> None:
        if not self.in_scope(obj):
            return
        if resource is DEPLOYMENTS:
            self.on_deployment(kind, obj)
        else:
            self.on_config(resource, kind, obj)


async def serve_ready(floor: Floor, port: int) -> web.AppRunner:
    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=200 if floor.listed == 3 else 503)

    app = web.Application()
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def run(kubeconfig: str, namespaces: frozenset[str], port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    api = await connect(kubeconfig=kubeconfig)
    floor = Floor(api, namespaces)
    runner = await serve_ready(floor, port)
    try:
        async with asyncio.TaskGroup() as group:
            floor.group = group
            watches = [
                group.create_task(floor.follow(r)) for r in (DEPLOYMENTS, CONFIGMAPS, SECRETS)
            ]
            await stop.wait()
            for task in watches:
                task.cancel()
    finally:
        await runner.cleanup()
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespaces", default="")
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args()
    namespaces = frozenset(n for n in args.namespaces.split(",") if n)
    asyncio.run(run(args.kubeconfig, namespaces, args.metrics_port))


if __name__ == "__main__":
    main()
