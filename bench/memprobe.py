"""Where the memory per cached object goes, without a cluster.

The scale run measures RSS from outside, which mixes the cache with what the allocator keeps after
decoding the initial lists. This probe builds the controller itself (``app.Controller``: its
informers with their transforms, the reference index and the work queue they feed; no request is
sent) and runs each informer's own page path (a ``pages.ListPage`` read into
``Informer._upsert_page``) in-process, on list pages encoded as the API server sends them
(metadata with uid, resourceVersion, timestamps and ``managedFields``), and reports:

- the RSS delta after the sync, after ``Controller.settle_caches`` (what the controller does once
  synced: the packed tables compacted, the lists' memory trimmed), and per cached object;
- with ``--trace``, the tracemalloc size of what stays alive and the top allocation sites.

What it leaves out, and the scale run includes: the records on workloads (about 450 B per
Deployment with ten configs), the connections' buffers, and the first pass over the workloads.

Run: ``python -m bench.memprobe`` (10k ConfigMaps + 10k Secrets of 4 KiB + 2k Deployments).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any, cast

import orjson
import psutil  # type: ignore[import-untyped]
from kubernetes_asyncio.client.configuration import Configuration

from bench.scale import ScaleSizes, objects
from reloader.app import Controller, release_freed_memory
from reloader.digests import DigestKey
from reloader.kube import Api
from reloader.pages import ListPage
from reloader.settings import Settings
from reloader.watch import CONFIG_PAGE_SIZE, WORKLOAD_PAGE_SIZE, Informer, Unseen

_KIND_BY_PLURAL = {"configmaps": "ConfigMap", "secrets": "Secret", "deployments": "Deployment"}


def _served(path: str, body: dict[str, Any], number: int) -> dict[str, Any]:
    """``body`` as a list returns it: the namespace from ``path``, and the metadata the API
    server adds (list bodies carry ``managedFields``)."""
    *_, namespace, _plural = path.rstrip("/").split("/")
    metadata = dict(body["metadata"])
    metadata.update(
        namespace=namespace,
        uid=f"{number:08x}-0000-4000-8000-{number:012x}",
        resourceVersion=str(100_000 + number),
        creationTimestamp="2026-11-25T16:40:00Z",
        managedFields=[
            {
                "manager": "bench",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2026-11-25T16:40:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:data": {".": {}, "f:value": {}}},
            }
        ],
    )
    return {**body, "metadata": metadata}


def pages(sizes: ScaleSizes, config_page: int) -> Iterator[tuple[str, bytes]]:
    """(kind, encoded page), grouped by kind as the informers list: up to ``config_page`` configs
    or WORKLOAD_PAGE_SIZE workloads a page."""
    current = ""
    items: list[dict[str, Any]] = []
    for number, (path, body) in enumerate(objects(sizes)):
        kind = _KIND_BY_PLURAL[path.rstrip("/").rsplit("/", 1)[1]]
        limit = WORKLOAD_PAGE_SIZE if kind == "Deployment" else config_page
        if items and (kind != current or len(items) >= limit):
            yield current, orjson.dumps({"metadata": {}, "items": items})
            items = []
        current = kind
        items.append(_served(path, dict(body), number))
    if items:
        yield current, orjson.dumps({"metadata": {}, "items": items})


def _controller() -> Controller:
    """The controller as ``reloader`` builds it with default settings; its API client is never
    used (the page path sends no request)."""
    return Controller(
        settings=Settings(),
        api=Api(Configuration()),
        digest_key=DigestKey.from_secret(b"k" * 32),
    )


def rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_probe(argv))


async def _probe(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memprobe", description=__doc__)
    parser.add_argument("--configmaps", type=int, default=10_000)
    parser.add_argument("--secrets", type=int, default=10_000)
    parser.add_argument("--deployments", type=int, default=2_000)
    parser.add_argument("--config-page-size", type=int, default=CONFIG_PAGE_SIZE)
    parser.add_argument("--trace", action="store_true", help="tracemalloc (slower; RSS inflated)")
    args = parser.parse_args(argv)
    sizes = ScaleSizes(
        configmaps=args.configmaps, secrets=args.secrets, deployments=args.deployments
    )
    encoded = list(
        pages(sizes, args.config_page_size)
    )  # the bodies exist before the probe, as on the wire
    controller = _controller()
    informers: dict[str, Informer[Any]] = {}
    for kinds in (controller.configs, controller.workloads):
        informers.update(cast(dict[str, Informer[Any]], kinds))
    release_freed_memory()
    if args.trace:
        tracemalloc.start()
    before = rss()
    traced_before = tracemalloc.get_traced_memory()[0] if args.trace else 0
    peak = before
    unseen: Unseen = {}  # a first list: nothing stored before it
    for kind, body in encoded:
        page = ListPage(body)
        informers[kind]._upsert_page(page.objects(), unseen)
        peak = max(peak, rss())
        del page
    gc.collect()
    synced = rss()
    controller.settle_caches()
    trimmed = rss()
    cached = sum(len(i) for i in informers.values())
    configs = sizes.configmaps + sizes.secrets
    print(f"cached objects: {cached} ({configs} configs, {sizes.deployments} workloads)")
    print(f"RSS before: {before / 2**20:.1f} MiB, peak during sync +{(peak - before) / 2**20:.1f}")
    print(f"RSS after sync: +{(synced - before) / 2**20:.1f} MiB")
    print(
        f"RSS after settle_caches: +{(trimmed - before) / 2**20:.1f} MiB, "
        f"{(trimmed - before) / cached:.0f} B per cached object"
    )
    if args.trace:
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        print(f"traced (alive): {traced / 2**20:.1f} MiB, {traced / cached:.0f} B per object")
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:12]:
            print(f"  {stat.size / 2**20:7.2f} MiB {stat.count:8d} {stat.traceback}")
    sys.stdout.flush()
    await controller.api.close()


if __name__ == "__main__":
    main()
