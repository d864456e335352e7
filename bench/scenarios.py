"""S1..S13: the scenarios of Stakater Reloader's load test, so results compare, with the number of
rollouts each semantics must produce.

Each body creates its configs and workloads, waits until the controller has settled, then makes its
changes; the harness then waits for the expected rollouts and a quiet period. ``level`` is what our
controller must do (one rollout per data change it has not acted on; none at startup; a burst within
the debounce is one), ``edge`` what Stakater does (one per event that changes data). Where the two
differ, the scenario says why in its docstring.

Every workload opts in with ``reloader.stakater.com/auto: "true"``. Sizes are parameters
(``Sizes``); ``--quick`` uses ``QUICK_SIZES`` and the scenarios marked ``quick`` (Stakater's PR
set S1, S4, S6, plus S2 for the latency floor and S9 for the workload kinds).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bench import cluster
from bench.harness import Planned, Scenario, ScenarioContext
from bench.observe import percentile
from reloader.model import KINDS, ConfigKey, WorkloadKindName


@dataclass(frozen=True)
class Sizes:
    burst_updates: int = 10
    burst_dependents: int = 5
    fanout: int = 50
    cardinality_namespaces: int = 20
    cardinality_per_namespace: int = 10
    cardinality_rate: float = 50.0
    noop: int = 20
    churn: int = 20
    restart: int = 20
    pressure: int = 200
    large: int = 10
    large_kib: int = 150
    per_kind: int = 3
    secrets: int = 20
    strategy: int = 20
    complex: int = 3
    pause: int = 3


SIZES = Sizes()
QUICK_SIZES = Sizes(cardinality_namespaces=5, cardinality_per_namespace=5, pressure=50)


def pairs(ctx: ScenarioContext, prefix: str, count: int, namespace: int = 0) -> list[Planned]:
    """``count`` Deployments, each reading a ConfigMap of its own."""
    keys = [ctx.config("ConfigMap", f"{prefix}-{i}", namespace) for i in range(count)]
    return [ctx.deployment(f"{prefix}-{i}", key) for i, key in enumerate(keys)]


def used(planned: list[Planned]) -> list[ConfigKey]:
    return sorted({key for plan in planned for key in plan.uses})


async def create(ctx: ScenarioContext, planned: list[Planned], *, size: int = 64) -> None:
    await ctx.create_configs(used(planned), size=size)
    await ctx.create_workloads(planned)


def scenarios(sizes: Sizes) -> list[Scenario]:
    """The scenario list for ``sizes``; bodies close over the sizes."""

    async def s1_burst(ctx: ScenarioContext) -> None:
        """One ConfigMap updated ``burst_updates`` times, 50 ms apart. Ours with a debounce longer
        than the burst: one rollout per dependent; Stakater: one per update."""
        cm = ctx.config("ConfigMap", "burst")
        planned = [
            ctx.deployment(f"burst-{i}", cm, edge=sizes.burst_updates)
            for i in range(sizes.burst_dependents)
        ]
        await create(ctx, planned)
        await ctx.settled()
        for _ in range(sizes.burst_updates):
            await ctx.change([cm])
            await asyncio.sleep(0.05)

    async def s2_fanout(ctx: ScenarioContext) -> None:
        """One ConfigMap used by ``fanout`` Deployments, changed once."""
        cm = ctx.config("ConfigMap", "shared")
        await create(ctx, [ctx.deployment(f"fan-{i}", cm) for i in range(sizes.fanout)])
        await ctx.settled()
        await ctx.change([cm])

    async def s3_cardinality(ctx: ScenarioContext) -> None:
        """Many namespaces, a ConfigMap and a Deployment per slot; every ConfigMap changed once,
        at a steady rate."""
        planned = [
            plan
            for ns in range(sizes.cardinality_namespaces)
            for plan in pairs(ctx, f"card-{ns}", sizes.cardinality_per_namespace, ns)
        ]
        await create(ctx, planned)
        await ctx.settled()
        await ctx.change(used(planned), in_flight=8, rate=sizes.cardinality_rate)

    async def s4_noop(ctx: ScenarioContext) -> None:
        """Labels and annotations of the ConfigMaps changed twice, data untouched: no rollout."""
        planned = [
            ctx.deployment(p.key.name, *p.uses, level=0, edge=0)
            for p in pairs(ctx, "noop", sizes.noop)
        ]
        await create(ctx, planned)
        await ctx.settled()
        for round_ in (1, 2):
            await ctx.relabel(used(planned), round_)

    async def s5_churn(ctx: ScenarioContext) -> None:
        """Deployments deleted and created while ConfigMaps change; then the new ones' ConfigMaps
        change. Every surviving and new Deployment rolls once; no deleted one is touched."""
        stay, old = pairs(ctx, "stay", sizes.churn), pairs(ctx, "old", sizes.churn)
        new = pairs(ctx, "new", sizes.churn)
        await ctx.create_configs(used(new))
        await create(ctx, stay + old)
        await ctx.settled()
        await asyncio.gather(
            ctx.delete_workloads(p.key for p in old),
            ctx.create_workloads(new),
            ctx.change(used(stay), in_flight=4),
        )
        await ctx.change(used(old), in_flight=4)  # their Deployments are gone: nothing to do
        await ctx.settled()
        await ctx.change(used(new), in_flight=4)

    async def s6_restart(ctx: ScenarioContext) -> None:
        """Half the ConfigMaps change, the controller is stopped, the other half change, the
        controller starts again. Ours: every Deployment rolls exactly once (the changes made while
        it was down are caught up, nothing rolls twice). Stakater misses the down-time changes."""
        planned = pairs(ctx, "restart", sizes.restart)
        half = len(planned) // 2
        before, during = planned[:half], planned[half:]
        planned = before + [ctx.deployment(p.key.name, *p.uses, edge=0) for p in during]
        await create(ctx, planned)
        await ctx.settled()
        await ctx.change(used(before), in_flight=4)
        ctx.notes["first_half_rolled"] = await ctx.wait_rollouts(p.key for p in before)
        assert ctx.stop_controller is not None
        assert ctx.start_controller is not None
        await ctx.stop_controller()
        await ctx.change(used(during), in_flight=4, timed=False)
        await ctx.start_controller()

    async def s7_pressure(ctx: ScenarioContext) -> None:
        """``pressure`` ConfigMaps changed at once, 50 requests in flight."""
        planned = pairs(ctx, "pressure", sizes.pressure)
        await create(ctx, planned)
        await ctx.settled()
        await ctx.change(used(planned), in_flight=cluster.IN_FLIGHT)

    async def s8_large(ctx: ScenarioContext) -> None:
        """ConfigMaps over 100 KiB, each changed once (to another large value)."""
        planned = pairs(ctx, "large", sizes.large)
        await create(ctx, planned, size=sizes.large_kib * 1024)
        await ctx.settled()
        await ctx.change(used(planned), in_flight=4)

    async def s9_kinds(ctx: ScenarioContext) -> None:
        """Deployments, StatefulSets, DaemonSets and CronJobs, each with a ConfigMap of its own;
        a CronJob's rollout is a Job created from it."""
        planned = []
        kinds: tuple[WorkloadKindName, ...] = ("Deployment", "StatefulSet", "DaemonSet", "CronJob")
        for kind in kinds:
            for i in range(sizes.per_kind):
                name = f"{kind.lower()}-{i}"
                cm = ctx.config("ConfigMap", name)
                spec = cluster.pod_spec([cluster.container(**cluster.env_from(cm))])
                planned.append(ctx.plan(kind, name, spec, uses=[cm]))
        await create(ctx, planned)
        await ctx.settled()
        await ctx.change(used(planned), in_flight=4)

    async def s10_secrets(ctx: ScenarioContext) -> None:
        """Deployments reading a Secret, and Deployments reading a ConfigMap and a Secret that
        change together (back to back). Ours, debouncing: one rollout each; Stakater: two for the
        mixed ones (its issue #508)."""
        only = [
            ctx.deployment(f"secret-{i}", ctx.config("Secret", f"secret-{i}"))
            for i in range(sizes.secrets)
        ]
        mixed = [
            ctx.deployment(
                f"mixed-{i}",
                ctx.config("ConfigMap", f"mixed-cm-{i}"),
                ctx.config("Secret", f"mixed-secret-{i}"),
                edge=2,
            )
            for i in range(sizes.secrets)
        ]
        await create(ctx, only + mixed)
        await ctx.settled()
        await ctx.change(used(only), in_flight=4)
        for plan in mixed:
            await ctx.change(sorted(plan.uses))

    async def s11_env_vars(ctx: ScenarioContext) -> None:
        """The env-vars strategy: the rollout is a ``STAKATER_<NAME>_CONFIGMAP`` variable."""
        planned = pairs(ctx, "envvars", sizes.strategy)
        await create(ctx, planned)
        await ctx.settled()
        await ctx.change(used(planned), in_flight=4)
        await ctx.wait_rollouts(p.key for p in planned)
        first = planned[0].key
        path = KINDS["Deployment"].resource.object_path(first.namespace, first.name)
        body = await ctx.api.get(path)
        containers = body.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        names = [e.get("name", "") for c in containers for e in c.get("env") or []]
        ctx.notes["env_var_set"] = any(n.startswith("STAKATER_") for n in names)

    async def s12_pause(ctx: ScenarioContext) -> None:
        """Deployments with ``pause-period: 5s``: the rollout pauses the Deployment
        (``spec.paused``), which is resumed about 5 s later."""
        annotations = {**cluster.AUTO, "deployment.reloader.stakater.com/pause-period": "5s"}
        planned = []
        for i in range(sizes.pause):
            cm = ctx.config("ConfigMap", f"pause-{i}")
            spec = cluster.pod_spec([cluster.container(**cluster.env_from(cm))])
            planned.append(
                ctx.plan("Deployment", f"pause-{i}", spec, uses=[cm], annotations=annotations)
            )
        await create(ctx, planned)
        await ctx.settled()
        await ctx.change(used(planned))
        await ctx.wait_rollouts(p.key for p in planned)
        await _wait_resumed(ctx, planned, limit=30)

    async def s13_complex(ctx: ScenarioContext) -> None:
        """References beyond envFrom: init containers, ``valueFrom`` keys, volumes, projected
        volumes mixing a ConfigMap and a Secret (only the ConfigMap changes)."""
        planned = []
        for i in range(sizes.complex):
            planned += _complex_workloads(ctx, i)
        changed = sorted({k for p in planned for k in p.uses if not k.name.startswith("keep-")})
        await ctx.create_configs(used(planned))
        await ctx.create_workloads(planned)
        await ctx.settled()
        await ctx.change(changed, in_flight=4)

    return [
        Scenario(
            "S1",
            "burst",
            f"one ConfigMap updated {sizes.burst_updates}x, 50 ms apart;"
            f" {sizes.burst_dependents} dependents; debounce 2 s",
            s1_burst,
            quick=True,
            debounce=2.0,
        ),
        Scenario(
            "S2",
            "fan-out",
            f"one ConfigMap used by {sizes.fanout} Deployments",
            s2_fanout,
            quick=True,
            floor=True,
        ),
        Scenario(
            "S3",
            "high cardinality",
            f"{sizes.cardinality_namespaces} namespaces x {sizes.cardinality_per_namespace}"
            f" ConfigMaps, each changed once at {sizes.cardinality_rate:g}/s",
            s3_cardinality,
            floor=True,
            namespaces=sizes.cardinality_namespaces,
        ),
        Scenario("S4", "no-op", "labels/annotations only, twice: no rollout", s4_noop, quick=True),
        Scenario("S5", "churn", "Deployments deleted/created while ConfigMaps change", s5_churn),
        Scenario(
            "S6",
            "controller restart",
            "changes before and during a controller restart",
            s6_restart,
            quick=True,
        ),
        Scenario(
            "S7",
            "API pressure",
            f"{sizes.pressure} ConfigMaps changed at once",
            s7_pressure,
            floor=True,
        ),
        Scenario(
            "S8", "large objects", f"{sizes.large} ConfigMaps of {sizes.large_kib} KiB", s8_large
        ),
        Scenario(
            "S9",
            "workload kinds",
            "Deployment, StatefulSet, DaemonSet, CronJob",
            s9_kinds,
            quick=True,
        ),
        Scenario(
            "S10",
            "secrets and mixed",
            "Secrets; ConfigMap+Secret changed together",
            s10_secrets,
            debounce=1.0,
        ),
        Scenario(
            "S11",
            "env-vars strategy",
            "--reload-strategy=env-vars",
            s11_env_vars,
            reload_strategy="env-vars",
        ),
        Scenario("S12", "pause period", "pause-period 5s: paused, then resumed", s12_pause),
        Scenario(
            "S13",
            "complex references",
            "init containers, valueFrom, volumes, projected",
            s13_complex,
        ),
    ]


def _complex_workloads(ctx: ScenarioContext, i: int) -> list[Planned]:
    """One Deployment per reference method; ``keep-*`` configs are used but never changed."""
    cm = {m: ctx.config("ConfigMap", f"{m}-cm-{i}") for m in ("init", "key", "vol", "proj")}
    secret = {m: ctx.config("Secret", f"{m}-secret-{i}") for m in ("key", "vol", "initsec")}
    keep = ctx.config("Secret", f"keep-proj-{i}")
    app = cluster.container
    shapes = {
        "init": ([app()], [app("init", **cluster.env_from(cm["init"]))], None, [cm["init"]]),
        "key": ([app(**cluster.key_env(cm["key"], "value"))], None, None, [cm["key"]]),
        "skey": ([app(**cluster.key_env(secret["key"], "value"))], None, None, [secret["key"]]),
        "vol": ([app()], None, [cluster.volume(cm["vol"])], [cm["vol"]]),
        "svol": ([app()], None, [cluster.volume(secret["vol"])], [secret["vol"]]),
        "sinit": (
            [app()],
            [app("init", **cluster.env_from(secret["initsec"]))],
            None,
            [secret["initsec"]],
        ),
        "proj": ([app()], None, [cluster.projected([cm["proj"], keep])], [cm["proj"], keep]),
    }
    planned = []
    for method, (containers, inits, volumes, uses) in shapes.items():
        spec = cluster.pod_spec(containers, init_containers=inits, volumes=volumes)
        planned.append(ctx.plan("Deployment", f"{method}-{i}", spec, uses=uses))
    return planned


async def _wait_resumed(ctx: ScenarioContext, planned: list[Planned], *, limit: float) -> None:
    """Record how many Deployments were seen paused and resumed, and after how long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        if all(_resumed_after(ctx, p) is not None for p in planned):
            break
        await asyncio.sleep(0.1)
    delays = [d for p in planned if (d := _resumed_after(ctx, p)) is not None]
    paused = sum(1 for p in planned if any(v for _, v in ctx.observer.paused.get(p.key, [])))
    ctx.notes["paused_seen"] = f"{paused}/{len(planned)}"
    ctx.notes["resumed"] = f"{len(delays)}/{len(planned)}"
    ctx.notes["resume_after_p50_s"] = percentile(delays, 50)


def _resumed_after(ctx: ScenarioContext, plan: Planned) -> float | None:
    history = ctx.observer.paused.get(plan.key, [])
    paused_at = next((at for at, value in history if value), None)
    resumed = next(
        (at for at, value in history if not value and paused_at and at > paused_at), None
    )
    return resumed - paused_at if resumed is not None and paused_at is not None else None
