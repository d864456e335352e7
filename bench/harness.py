"""One scenario against one controller, in namespaces of its own, measured end to end.

The sequence of every run::

    fresh namespaces → observer synced → controller started, ready (time to ready)
      → scenario setup (configs, workloads) → settled → scenario changes (timestamped)
      → wait until every workload has its expected rollouts (or the deadline) → quiet period
      → controller stopped → rollouts, latency, audited requests, RSS/CPU collected

"Settled" means no workload event for ``SETTLE_QUIET`` seconds and, for a level-triggered
controller, every workload carrying its digest record: a change made before the controller has
seen a workload would be that workload's first sight, not a change. The quiet period after the
expected count is reached is what makes "exactly" exact: a late duplicate shows up as a miss.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cluster
from bench.apicost import AuditLog, by_verb, failures, writes
from bench.cluster import BenchPlane
from bench.controller import Contender, Launch, RunningController, Sample
from bench.observe import Observer, WriteLog, latencies, observing, timed_rollouts
from bench.phases import phases
from reloader.kube import Api
from reloader.model import (
    CONFIG_RESOURCES,
    KINDS,
    ConfigKey,
    ConfigKind,
    WorkloadKey,
    WorkloadKindName,
)

SETTLE_QUIET = 1.0
QUIET = 2.0
_run_ids = itertools.count(1)


@dataclass
class Bench:
    """What every run shares: the plane, the bench's admin client, the audit log, where to write."""

    plane: BenchPlane
    api: Api
    audit: AuditLog
    work_dir: Path
    controller_namespace: str
    origin: float = field(default_factory=time.monotonic)
    expect_timeout: float = 90.0


@dataclass(frozen=True)
class Planned:
    """A workload a scenario creates, the configs it uses, the rollouts each semantics expects."""

    key: WorkloadKey
    body: Mapping[str, Any]
    uses: frozenset[ConfigKey]
    level: int
    edge: int


@dataclass
class RunResult:
    """Everything measured in one run; serialised as is into the results JSON."""

    scenario: str
    contender: str
    expected: int
    actual: int
    mismatched: list[str]
    latencies: list[float]
    requests: dict[str, int]
    run_requests: dict[str, int]
    failed_requests: dict[str, int]
    startup_writes: int
    peak_rss: int
    steady_rss: int
    cpu_seconds: float
    ready_seconds: float
    wall_seconds: float
    rss_series: list[tuple[float, int]]
    notes: dict[str, Any]
    log: str
    round: int = 1
    """Which run of this scenario for this contender (``--rounds``); 1 for a single run."""
    cpu_wait_seconds: float = 0.0
    """Seconds the controller's threads were ready to run with no CPU free (``controller.
    run_queue_seconds``, at the last sample; threads that ended before it are not counted)."""
    reaction: list[float] = field(default_factory=list)
    """Per timed rollout: config write → the controller's write received by the server
    (``phases``)."""
    server: list[float] = field(default_factory=list)
    """Per timed rollout: the API server's time on that write (received → answered)."""

    @property
    def exact(self) -> bool:
        return not self.mismatched

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
class ScenarioContext:
    """What a scenario body uses: create, settle, change, and (S6) stop and start the controller."""

    api: Api
    namespaces: list[str]
    observer: Observer
    contender: Contender
    writes: WriteLog = field(default_factory=WriteLog)
    planned: dict[WorkloadKey, Planned] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    settled_wall: float = 0.0
    stop_controller: Callable[[], Awaitable[None]] | None = None
    start_controller: Callable[[], Awaitable[None]] | None = None
    _versions: dict[ConfigKey, int] = field(default_factory=dict)
    _sizes: dict[ConfigKey, int] = field(default_factory=dict)

    # --- setup ---------------------------------------------------------------------------------

    def config(self, kind: ConfigKind, name: str, namespace: int = 0) -> ConfigKey:
        return ConfigKey(kind, self.namespaces[namespace], name)

    def _data(self, key: ConfigKey) -> dict[str, str]:
        version = self._versions.get(key, 0)
        size = self._sizes.get(key, 64)
        return {"value": cluster.filler(size, f"{key}-{version}")}

    async def create_configs(self, keys: Iterable[ConfigKey], *, size: int = 64) -> None:
        items = []
        for key in keys:
            self._sizes[key] = size
            path = CONFIG_RESOURCES[key.kind].collection_path(key.namespace)
            items.append((path, cluster.config_body(key, self._data(key))))
        await cluster.create_many(self.api, items)

    def plan(
        self,
        kind: WorkloadKindName,
        name: str,
        spec: Mapping[str, Any],
        *,
        uses: Iterable[ConfigKey],
        level: int = 1,
        edge: int = 1,
        namespace: int = 0,
        annotations: Mapping[str, str] = cluster.AUTO,
    ) -> Planned:
        body = cluster.workload(kind, name, spec, annotations=annotations)
        key = WorkloadKey(kind, self.namespaces[namespace], name)
        return Planned(key, body, frozenset(uses), level, edge)

    def deployment(self, name: str, *uses: ConfigKey, level: int = 1, edge: int = 1) -> Planned:
        """The common case: a Deployment reading whole configs through ``envFrom``."""
        spec = cluster.pod_spec([cluster.container(**cluster.env_from(*uses))])
        namespace = self.namespaces.index(uses[0].namespace)
        return self.plan(
            "Deployment", name, spec, uses=uses, level=level, edge=edge, namespace=namespace
        )

    async def create_workloads(self, planned: Iterable[Planned]) -> None:
        items = []
        for plan in planned:
            self.planned[plan.key] = plan
            items.append((cluster.workload_path(plan.key.kind, plan.key.namespace), plan.body))
        await cluster.create_many(self.api, items)

    async def delete_workloads(self, keys: Iterable[WorkloadKey]) -> None:
        for key in keys:
            path = KINDS[key.kind].resource.object_path(key.namespace, key.name)
            await self.api.delete(path)
            self.planned.pop(key, None)

    # --- settling ------------------------------------------------------------------------------

    async def settled(self, *, limit: float = 60.0) -> None:
        """Wait until the controller has seen every planned workload and the cluster is quiet."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self.observer.last_event >= SETTLE_QUIET
            if quiet and self._all_recorded():
                break
            await asyncio.sleep(0.1)
        else:
            self.notes["settle_timeout"] = True
        self.settled_wall = time.time()

    def _all_recorded(self) -> bool:
        if self.contender.semantics != "level":
            return True
        return all(key in self.observer.recorded for key in self.planned)

    # --- changes -------------------------------------------------------------------------------

    async def change(
        self,
        keys: Sequence[ConfigKey],
        *,
        in_flight: int = 1,
        rate: float | None = None,
        timed: bool = True,
    ) -> None:
        """Change the data of each config once: ``in_flight`` at a time, at most ``rate``/s."""
        pending = iter(keys)
        start = time.monotonic()
        sent = itertools.count()

        async def sender() -> None:
            for key in pending:
                if rate:
                    await asyncio.sleep(max(0.0, start + next(sent) / rate - time.monotonic()))
                await self._write(key, timed=timed)

        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, in_flight)):
                group.create_task(sender())

    async def _write(self, key: ConfigKey, *, timed: bool) -> None:
        self._versions[key] = self._versions.get(key, 0) + 1
        data = cluster.encoded_data(key, self._data(key))
        self.writes.record(key, timed=timed)
        await self.api.patch(cluster.config_path(key), {"data": data}, patch_type="merge")

    async def relabel(self, keys: Iterable[ConfigKey], round_: int) -> None:
        """Change labels and annotations only: no data, so no rollout is due."""
        for key in keys:
            meta = {"labels": {"bench-round": str(round_)}, "annotations": {"note": str(round_)}}
            await self.api.patch(cluster.config_path(key), {"metadata": meta}, patch_type="merge")

    async def wait_rollouts(self, keys: Iterable[WorkloadKey], *, limit: float = 60.0) -> bool:
        """Wait until each of ``keys`` has at least its expected rollouts; False at the deadline."""
        wanted = {key: self.expected(key) for key in keys}
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if all(len(self.observer.rollouts.get(k, ())) >= n for k, n in wanted.items()):
                return True
            await asyncio.sleep(0.05)
        return False

    def expected(self, key: WorkloadKey) -> int:
        plan = self.planned.get(key)
        if plan is None:
            return 0
        return plan.level if self.contender.semantics == "level" else plan.edge


Body = Callable[[ScenarioContext], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """A numbered scenario: its body, and how the controller is run for it."""

    id: str
    title: str
    description: str
    body: Body
    quick: bool = False
    floor: bool = False
    debounce: float = 0.0
    reload_strategy: str = "annotations"
    namespaces: int = 1


# --- one run ----------------------------------------------------------------------------------


@dataclass
class _Lifecycle:
    """The controller processes of one run (more than one when the scenario restarts it)."""

    bench: Bench
    contender: Contender
    launch: Launch
    log_path: Path
    processes: list[RunningController] = field(default_factory=list)

    async def start(self) -> None:
        process = RunningController(
            self.contender, self.launch, self.log_path, origin=self.bench.origin
        )
        process.start()
        self.processes.append(process)
        try:
            await process.wait_ready()
        except RuntimeError:
            await process.stop()
            raise

    async def stop(self) -> None:
        if self.processes and self.processes[-1].running():
            await self.processes[-1].stop()

    def samples(self) -> list[Sample]:
        return [s for p in self.processes for s in p.samples]


async def run_scenario(bench: Bench, scenario: Scenario, contender: Contender) -> RunResult:
    """Run ``scenario`` against ``contender`` in fresh namespaces and measure it."""
    run_id = next(_run_ids)
    prefix = f"b{run_id}-{scenario.id.lower()}-{contender.name}"
    namespaces = [f"{prefix}-{i}" for i in range(scenario.namespaces)]
    await cluster.create_namespaces(bench.api, namespaces)
    user = f"bench-{prefix}"
    launch = Launch(
        kubeconfig=bench.plane.kubeconfig_for(user, bench.work_dir),
        namespaces=namespaces,
        controller_namespace=bench.controller_namespace,
        debounce=scenario.debounce,
        reload_strategy=scenario.reload_strategy,
    )
    lifecycle = _Lifecycle(bench, contender, launch, bench.work_dir / f"{prefix}.log")
    started = time.monotonic()
    try:
        async with observing(bench.api, set(namespaces)) as observer:
            context = ScenarioContext(
                bench.api,
                namespaces,
                observer,
                contender,
                stop_controller=lifecycle.stop,
                start_controller=lifecycle.start,
            )
            await lifecycle.start()
            await scenario.body(context)
            await context.wait_rollouts(context.planned, limit=bench.expect_timeout)
            await asyncio.sleep(QUIET)
            await lifecycle.stop()
    finally:
        await lifecycle.stop()
        await cluster.delete_namespaces(bench.api, namespaces)
    await asyncio.sleep(0.3)  # the audit log is written as requests complete; let the last land
    return _collect(bench, scenario, lifecycle, context, user, time.monotonic() - started)


def _restarts(lifecycle: _Lifecycle) -> dict[str, Any]:
    """Time to ready of each process, when the scenario restarted the controller."""
    if len(lifecycle.processes) < 2:
        return {}
    return {"ready_seconds_each": [p.ready_seconds for p in lifecycle.processes]}


def _mismatches(context: ScenarioContext) -> list[str]:
    keys = set(context.planned) | set(context.observer.rollouts)
    found = []
    for key in sorted(keys):
        want, got = context.expected(key), len(context.observer.rollouts.get(key, ()))
        if want != got:
            found.append(f"{key}: expected {want}, saw {got}")
    return found


def _collect(
    bench: Bench,
    scenario: Scenario,
    lifecycle: _Lifecycle,
    context: ScenarioContext,
    user: str,
    wall: float,
) -> RunResult:
    requests = bench.audit.requests(user)
    samples = lifecycle.samples()
    first = samples[0].at if samples else 0.0
    deps = {key: plan.uses for key, plan in context.planned.items()}
    timed = timed_rollouts(context.observer.rollouts, deps, context.writes)
    split = phases(timed, requests, wall_offset=time.time() - time.monotonic())
    return RunResult(
        scenario=scenario.id,
        contender=lifecycle.contender.name,
        expected=sum(context.expected(k) for k in context.planned),
        actual=context.observer.total(),
        mismatched=_mismatches(context),
        latencies=latencies(timed),
        requests=by_verb(requests),
        run_requests=by_verb(r for r in requests if r.at >= context.settled_wall),
        failed_requests=failures(requests),
        startup_writes=writes(requests, until=context.settled_wall),
        peak_rss=max((s.rss for s in samples), default=0),
        steady_rss=samples[-1].rss if samples else 0,
        cpu_seconds=sum(p.samples[-1].cpu for p in lifecycle.processes if p.samples),
        cpu_wait_seconds=sum(p.samples[-1].waited for p in lifecycle.processes if p.samples),
        ready_seconds=lifecycle.processes[0].ready_seconds or 0.0,
        wall_seconds=wall,
        rss_series=[(round(s.at - first, 2), s.rss) for s in samples],
        notes={**context.notes, **_restarts(lifecycle)},
        log=str(lifecycle.log_path),
        reaction=split.reaction,
        server=split.server,
    )
