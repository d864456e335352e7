"""The whole benchmark, top-down, as ``python -m bench`` runs it::

    options → scenario plane (audited) → for each scenario: ours, then --vs, then the floor
            → scenario plane stopped → scale plane: baselines, load, cold start, restart
            → tables and targets on stdout; JSON, Markdown and plots in bench/results/

Contenders alternate within each scenario, each in fresh namespaces, so a slow phase of the machine
(other jobs share these 2 cores) hits both rather than one; the latency scenarios run in rounds
(``--rounds``), and their p99 is taken over the writes of every round. The scale run has a plane of
its own so its 20k objects never slow the scenarios down.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench import cluster, report
from bench.apicost import AuditLog, metric_labels
from bench.controller import FLOOR, OURS, Contender, Semantics
from bench.harness import Bench, RunResult, Scenario, run_scenario
from bench.scale import QUICK_SCALE, ScaleResult, ScaleRunner, ScaleSizes, run_scale
from bench.scenarios import QUICK_SIZES, SIZES, Sizes, scenarios
from reloader.kube import ApiError, connect_with_dict

RESULTS = Path(__file__).with_name("results")
LATENCY_ROUNDS = 3
"""Runs of each latency scenario. One run's p99 is its second- or third-worst write; on two cores
shared with the API server and etcd one scheduling hiccup moves it by tens of milliseconds, which
against a floor of 30-200 ms read as ratios from 0.5x to 2.1x for the same code. Three rounds,
contenders alternating, give the p99 of 600 writes per scenario instead."""
CONTROLLER_NAMESPACE = "bench-system"


@dataclass(frozen=True)
class Options:
    quick: bool
    only: frozenset[str]
    scenarios: bool
    sizes: Sizes
    vs: Contender | None
    floor: bool
    scale: ScaleSizes | None
    results: Path
    rounds: int = 1
    """Runs of each scenario that has a floor run (the latency scenarios)."""


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, scenarios S1 S2 S4 S6 S9"
    )
    parser.add_argument("--scenarios", default="", help="comma-separated ids, e.g. S1,S7")
    parser.add_argument(
        "--vs",
        default="",
        help="command of another controller (placeholders: see bench/controller.py)",
    )
    parser.add_argument("--vs-name", default="vs", help="its column name")
    parser.add_argument(
        "--vs-semantics",
        choices=["edge", "level"],
        default="edge",
        help="expected rollouts: edge (Stakater) or level (ours)",
    )
    parser.add_argument(
        "--vs-ready-path",
        default="/metrics",
        help="HTTP path answering 200 when it is ready; empty: wait 3 s",
    )
    parser.add_argument(
        "--vs-port",
        type=int,
        default=None,
        help="the fixed port it serves the ready path on (Stakater: 9090); default: a free port"
        " passed as {metrics_port}",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the latency-floor runs")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="runs of each latency scenario, contenders alternating; p99 over all of them"
        f" (default {LATENCY_ROUNDS}, --quick 1)",
    )
    parser.add_argument("--no-scale", action="store_true", help="skip the scale run")
    parser.add_argument("--no-scenarios", action="store_true", help="only the scale run")
    defaults = ScaleSizes()
    parser.add_argument(
        "--scale-configmaps", type=int, default=None, help=f"default {defaults.configmaps}"
    )
    parser.add_argument(
        "--scale-secrets", type=int, default=None, help=f"default {defaults.secrets}"
    )
    parser.add_argument(
        "--scale-deployments", type=int, default=None, help=f"default {defaults.deployments}"
    )
    parser.add_argument(
        "--scale-namespaces", type=int, default=None, help=f"default {defaults.namespaces}"
    )
    parser.add_argument(
        "--scale-kib", type=int, default=None, help=f"KiB per config, default {defaults.kib}"
    )
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=N",
        help="override a scenario size (bench/scenarios.py Sizes), e.g. fanout=100; repeatable",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(list(argv))  # fmt: skip
    vs = None
    if args.vs:
        semantics: Semantics = args.vs_semantics
        vs = Contender(args.vs_name, args.vs, args.vs_ready_path, semantics, args.vs_port)
    return Options(
        quick=args.quick,
        only=frozenset(s.strip().upper() for s in args.scenarios.split(",") if s.strip()),
        scenarios=not args.no_scenarios,
        sizes=_scenario_sizes(args),
        vs=vs,
        floor=not args.no_floor,
        scale=None if args.no_scale else _scale_sizes(args),
        results=args.results,
        rounds=max(1, args.rounds or (1 if args.quick else LATENCY_ROUNDS)),
    )


def _scenario_sizes(args: argparse.Namespace) -> Sizes:
    base = QUICK_SIZES if args.quick else SIZES
    given: dict[str, Any] = {}
    for item in args.size:
        name, _, value = item.partition("=")
        field = Sizes.__dataclass_fields__.get(name)
        try:
            given[name] = (float if field and field.type == "float" else int)(value)
        except ValueError:
            field = None
        if field is None:
            raise SystemExit(f"bench: --size {item!r}: expected NAME=N, NAME a field of Sizes")
    return replace(base, **given)


def _scale_sizes(args: argparse.Namespace) -> ScaleSizes:
    base = QUICK_SCALE if args.quick else ScaleSizes()
    given = {
        field: getattr(args, f"scale_{field}")
        for field in ("configmaps", "secrets", "deployments", "namespaces", "kib")
        if getattr(args, f"scale_{field}") is not None
    }
    return replace(base, **given)


def selected(options: Options) -> list[Scenario]:
    every = scenarios(options.sizes)
    if not options.scenarios:
        return []
    if options.only:
        return [s for s in every if s.id in options.only]
    return [s for s in every if s.quick] if options.quick else every


def contenders_for(scenario: Scenario, options: Options) -> list[Contender]:
    """Ours first, then the other controller, then the floor (latency scenarios only)."""
    found = [OURS]
    if options.vs is not None:
        found.append(options.vs)
    if scenario.floor and options.floor:
        found.append(FLOOR)
    return found


async def run_scenarios(
    options: Options, work_dir: Path
) -> tuple[list[RunResult], dict[str, object]]:
    chosen = selected(options)
    if not chosen:
        return [], {}
    results = []
    with cluster.bench_plane(work_dir / "scenario-plane") as plane:
        api = await connect_with_dict(plane.plane.kubeconfig)
        try:
            facts: dict[str, Any] = {
                "kubernetes": (await api.get("/version")).get("gitVersion"),
                "apiserver_request_total_labels": metric_labels(plane.plane),
            }
            await cluster.create_namespaces(api, [CONTROLLER_NAMESPACE])
            bench = Bench(plane, api, AuditLog(plane.audit_log), work_dir, CONTROLLER_NAMESPACE)
            for scenario in chosen:
                rounds = options.rounds if scenario.floor and options.floor else 1
                for round_ in range(1, rounds + 1):
                    for contender in contenders_for(scenario, options):
                        result = await _run_one(bench, scenario, contender, facts, round_)
                        if result is not None:
                            results.append(result)
        finally:
            await api.close()
    return results, facts


async def _run_one(
    bench: Bench, scenario: Scenario, contender: Contender, facts: dict[str, Any], round_: int
) -> RunResult | None:
    """One run; a run that breaks (a controller that never gets ready) is reported, not fatal."""
    try:
        result = replace(await run_scenario(bench, scenario, contender), round=round_)
    except (RuntimeError, ApiError) as error:
        label = report.round_label(scenario.id, round_)
        print(f"  {label:<7} {contender.name:<9} FAILED: {error}", flush=True)
        facts.setdefault("failed_runs", []).append(f"{label} {contender.name}: {error}")
        return None
    print(report.summary_line(result), flush=True)
    return result


async def run_scale_plane(options: Options, work_dir: Path) -> list[ScaleResult]:
    if options.scale is None:
        return []
    contenders = [OURS] + ([options.vs] if options.vs is not None else [])
    with cluster.bench_plane(work_dir / "scale-plane") as plane:
        api = await connect_with_dict(plane.plane.kubeconfig)
        try:
            await cluster.create_namespaces(api, [CONTROLLER_NAMESPACE])
            runner = ScaleRunner(
                plane=plane,
                api=api,
                audit=AuditLog(plane.audit_log),
                work_dir=work_dir,
                controller_namespace=CONTROLLER_NAMESPACE,
                sizes=options.scale,
                origin=time.monotonic(),
            )
            return await run_scale(runner, contenders)
        finally:
            await api.close()


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def publish(
    options: Options,
    stamp: str,
    results: list[RunResult],
    scale: list[ScaleResult],
    facts: dict[str, object],
    wall: float,
) -> None:
    """Print the tables and targets; write JSON, Markdown and plots."""
    vs = options.vs.name if options.vs else None
    found = report.targets(results, scale, ours=OURS.name, vs=vs)
    scenario_rows = report.scenario_rows(results, OURS.name, vs)
    scale_rows = report.scale_rows(scale)
    print("\nScenarios\n" + report.text_table(report.SCENARIO_HEADER, scenario_rows))
    if scale_rows:
        print("\nScale\n" + report.text_table(report.SCALE_HEADER, scale_rows))
    print("\nTargets\n" + report.targets_text(found))
    out = options.results
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "stamp": stamp,
        "wall_seconds": round(wall, 1),
        "quick": options.quick,
        "vs_command": options.vs.command if options.vs else None,
        "machine": machine(),
        **facts,
        "scenario_descriptions": {s.id: f"{s.title}: {s.description}" for s in selected(options)},
        "targets": found,
        "scenarios": results,
        "scale": [{**dataclasses.asdict(s), "bytes_per_object": s.bytes_per_object} for s in scale],
    }  # fmt: skip
    report.write_json(out / f"{stamp}.json", payload)
    markdown = [report.markdown_table(report.SCENARIO_HEADER, scenario_rows)]
    if scale_rows:
        markdown.append(report.markdown_table(report.SCALE_HEADER, scale_rows))
    markdown.append(report.targets_text(found, bullet="- "))
    (out / f"{stamp}.md").write_text("\n\n".join(markdown) + "\n")
    report.plot_latency(results, out / f"{stamp}-latency.png")
    report.plot_rss(results, scale, out / f"{stamp}-rss.png")
    print(f"\nwrote {out / stamp}.json, .md, -latency.png, -rss.png ({wall:.0f} s in all)")


async def run(options: Options) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work_dir = options.results / f"{stamp}-work"
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        results, facts = await run_scenarios(options, work_dir)
        scale = await run_scale_plane(options, work_dir)
    finally:
        for kubeconfig in work_dir.glob("*.kubeconfig"):
            kubeconfig.unlink()
    publish(options, stamp, results, scale, facts, time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(run(options))
