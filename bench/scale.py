"""The scale run: many ConfigMaps, Secrets and Deployments on a control plane of their own.

For each contender, cluster-wide (no namespace list), three phases, each a fresh process with its
own audited user:

1. ``empty``: started on the empty cluster, idle → the baseline RSS;
2. ``cold``: started after the objects exist → time to ready, time until settled (ours: every
   Deployment carries its digest record, one patch each, first sight only), peak and steady RSS;
3. ``restart``: started again with nothing changed → time to ready, steady RSS, and the number of
   write requests, which must be zero (counted from the audit log).

Bytes per cached object is ``(restart steady RSS - empty steady RSS) / objects``, where objects are
the ConfigMaps, Secrets and Deployments created. It is RSS, so it includes what the allocator keeps
after decoding the initial lists, not only what the cache holds: the honest, pessimistic number.

Deployment ``d`` uses (``envFrom``) the ConfigMaps and Secrets ``j`` with
``j * deployments // configs == d``, in namespace ``d % namespaces``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import cluster
from bench.apicost import AuditLog, by_verb, writes
from bench.cluster import BenchPlane
from bench.controller import Contender, Launch, RunningController
from bench.observe import Observer, observing
from reloader.kube import Api
from reloader.model import CONFIG_RESOURCES, ConfigKey, ConfigKind, WorkloadKey

IDLE = 5.0
"""Seconds a settled controller is left idle before its steady RSS is taken."""


@dataclass(frozen=True)
class ScaleSizes:
    configmaps: int = 10_000
    secrets: int = 10_000
    deployments: int = 2_000
    namespaces: int = 100
    kib: int = 4

    @property
    def objects(self) -> int:
        return self.configmaps + self.secrets + self.deployments


QUICK_SCALE = ScaleSizes(configmaps=500, secrets=500, deployments=100, namespaces=10)


@dataclass
class ScalePhase:
    """One process's life in the scale run."""

    phase: str
    ready_seconds: float
    settle_seconds: float
    peak_rss: int
    steady_rss: int
    cpu_seconds: float
    requests: dict[str, int]
    writes: int
    cached_objects: int | None
    rss_series: list[tuple[float, int]]


@dataclass
class ScaleResult:
    contender: str
    sizes: ScaleSizes
    create_seconds: float = 0.0
    phases: dict[str, ScalePhase] = field(default_factory=dict)

    @property
    def bytes_per_object(self) -> float | None:
        empty, loaded = self.phases.get("empty"), self.phases.get("restart")
        if empty is None or loaded is None:
            return None
        return (loaded.steady_rss - empty.steady_rss) / self.sizes.objects


def cached_objects(metrics: str) -> int | None:
    """The sum of ``reloader_cached_objects`` (ours only; None for a controller without it)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("reloader_cached_objects{")
    ]
    return int(sum(values)) if values else None


def namespace_names(sizes: ScaleSizes) -> list[str]:
    return [f"scale-{i}" for i in range(sizes.namespaces)]


def _configs(kind: ConfigKind, count: int, sizes: ScaleSizes) -> Iterator[tuple[int, ConfigKey]]:
    """(owning Deployment, key) for each config of ``kind``."""
    prefix = "cm" if kind == "ConfigMap" else "secret"
    for j in range(count):
        owner = j * sizes.deployments // count
        yield owner, ConfigKey(kind, f"scale-{owner % sizes.namespaces}", f"{prefix}-{j}")


def objects(sizes: ScaleSizes) -> Iterator[cluster.Item]:
    """Every config, then every Deployment, as (collection URL, body)."""
    uses: dict[int, list[ConfigKey]] = {}
    size = sizes.kib * 1024
    for kind, count in (("ConfigMap", sizes.configmaps), ("Secret", sizes.secrets)):
        for owner, key in _configs(kind, count, sizes):  # type: ignore[arg-type]
            uses.setdefault(owner, []).append(key)
            path = CONFIG_RESOURCES[key.kind].collection_path(key.namespace)
            yield path, cluster.config_body(key, {"value": cluster.filler(size, key.name)})
    for d in range(sizes.deployments):
        spec = cluster.pod_spec([cluster.container(**cluster.env_from(*uses.get(d, [])))])
        namespace = f"scale-{d % sizes.namespaces}"
        yield (
            cluster.workload_path("Deployment", namespace),
            cluster.workload("Deployment", f"app-{d}", spec),
        )


async def load(api: Api, sizes: ScaleSizes) -> float:
    """Create the namespaces and every object; returns the seconds it took."""
    started = time.monotonic()
    await cluster.create_namespaces(api, namespace_names(sizes))
    await cluster.create_many(api, objects(sizes))
    return time.monotonic() - started


@dataclass
class ScaleRunner:
    """Runs the phases of one contender against the scale plane."""

    plane: BenchPlane
    api: Api
    audit: AuditLog
    work_dir: Path
    controller_namespace: str
    sizes: ScaleSizes
    origin: float

    async def phase(self, contender: Contender, name: str, observer: Observer | None) -> ScalePhase:
        user = f"scale-{contender.name}-{name}"
        launch = Launch(
            kubeconfig=self.plane.kubeconfig_for(user, self.work_dir),
            namespaces=(),
            controller_namespace=self.controller_namespace,
        )
        process = RunningController(contender, launch, self.work_dir / f"{user}.log", self.origin)
        process.start()
        try:
            ready = await process.wait_ready(limit=600)
            settle = await self._settle(contender, observer, name) if observer else 0.0
            await asyncio.sleep(IDLE)
            cached = cached_objects(await process.metrics())
        finally:
            await process.stop()
        await asyncio.sleep(0.3)
        requests = self.audit.requests(user)
        samples = process.samples
        first = samples[0].at if samples else 0.0
        return ScalePhase(
            phase=name,
            ready_seconds=ready,
            settle_seconds=settle,
            peak_rss=max((s.rss for s in samples), default=0),
            steady_rss=samples[-1].rss if samples else 0,
            cpu_seconds=samples[-1].cpu if samples else 0.0,
            requests=by_verb(requests),
            writes=writes(requests),
            cached_objects=cached,
            rss_series=[(round(s.at - first, 2), s.rss) for s in samples],
        )

    async def _settle(self, contender: Contender, observer: Observer, phase: str) -> float:
        """Seconds after ready until quiet (ours, cold: until every Deployment is recorded)."""
        started = time.monotonic()
        wanted = {
            WorkloadKey("Deployment", f"scale-{d % self.sizes.namespaces}", f"app-{d}")
            for d in range(self.sizes.deployments)
        }
        deadline = started + 600
        while time.monotonic() < deadline:
            quiet = time.monotonic() - observer.last_event >= 2.0
            recorded = contender.semantics != "level" or wanted <= observer.recorded
            if quiet and recorded:
                break
            await asyncio.sleep(0.2)
        return max(0.0, observer.last_event - started)


async def run_scale(runner: ScaleRunner, contenders: list[Contender]) -> list[ScaleResult]:
    """Baselines on the empty cluster, load, then cold start and restart per contender."""
    results = {c.name: ScaleResult(c.name, runner.sizes) for c in contenders}
    for contender in contenders:
        results[contender.name].phases["empty"] = await runner.phase(contender, "empty", None)
        print(f"  scale {contender.name}: empty-cluster baseline done", flush=True)
    created = await load(runner.api, runner.sizes)
    print(f"  scale: created {runner.sizes.objects} objects in {created:.0f} s", flush=True)
    async with observing(runner.api, set(namespace_names(runner.sizes))) as observer:
        for contender in contenders:
            result = results[contender.name]
            result.create_seconds = created
            for name in ("cold", "restart"):
                result.phases[name] = await runner.phase(contender, name, observer)
                print(f"  scale {contender.name}: {name} done", flush=True)
    return list(results.values())
