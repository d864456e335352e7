"""``python -m bench.selfcheck``: the bench's pure parts, checked without a cluster or a clock.

Invoked by nobody automatically (CI runs ``tests/``, which holds no benchmark); run it after
changing how rollouts are counted, latencies attributed or requests parsed, since a wrong count
there would make every reported number wrong while looking fine.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench import cluster, floor, report, scale
from bench.apicost import Request, by_verb, failures, parse_event, writes
from bench.controller import (
    OURS,
    Contender,
    Launch,
    RunningController,
    render,
    run_queue_seconds,
)
from bench.harness import RunResult
from bench.observe import (
    WriteLog,
    cronjob_owner,
    latencies,
    percentile,
    template_signature,
    timed_rollouts,
)
from bench.phases import phases
from bench.scenarios import QUICK_SIZES, SIZES, scenarios
from reloader.model import ConfigKey, WorkloadKey


def check_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def check_latency_uses_latest_timed_write_before_rollout() -> None:
    cm, other = ConfigKey("ConfigMap", "ns", "a"), ConfigKey("ConfigMap", "ns", "b")
    app = WorkloadKey("Deployment", "ns", "app")
    log = WriteLog()
    log.entries[cm] += [(1.0, True), (2.0, True), (9.0, True)]
    log.entries[other] += [(4.0, False)]
    rollouts = {app: [3.0, 5.0], WorkloadKey("Deployment", "ns", "stray"): [3.0]}
    # 3.0 follows the write at 2.0; 5.0 follows the untimed 4.0 (downtime): left out.
    assert latencies(timed_rollouts(rollouts, {app: {cm, other}}, log)) == [1.0]


def check_signature_sees_template_changes_only() -> None:
    body = cluster.workload("Deployment", "app", cluster.pod_spec([cluster.container()]))
    before = template_signature(body, "Deployment")
    body["metadata"]["annotations"]["record"] = "x"
    assert template_signature(body, "Deployment") == before
    body["spec"]["template"]["metadata"]["annotations"] = {"restarted": "1"}
    assert template_signature(body, "Deployment") != before
    cron = cluster.workload("CronJob", "job", cluster.pod_spec([cluster.container()]))
    assert template_signature(cron, "CronJob") != b"{}"
    owned = {"metadata": {"ownerReferences": [{"kind": "CronJob", "name": "job"}]}}
    assert cronjob_owner(owned) == "job"


_AUDITED = json.dumps(
    {
        "auditID": "1",
        "verb": "patch",
        "user": {"username": "bench-x"},
        "objectRef": {"resource": "deployments", "namespace": "ns", "name": "app"},
        "responseStatus": {"code": 409},
        "requestReceivedTimestamp": "2026-01-01T00:00:00.500000Z",
        "userAgent": "reloader/0.1",
    }
)


def check_audit_event_parsing_and_counting() -> None:
    parsed = parse_event(_AUDITED)
    assert parsed is not None
    user, audit_id, request = parsed
    assert (user, audit_id, request.verb, request.code) == ("bench-x", "1", "patch", 409)
    assert parse_event("not json") is None
    assert by_verb([request, request]) == {"patch": 2}
    assert failures([request]) == {"409": 1}
    assert writes([request], since=request.at + 1) == 0
    review = replace(request, verb="create", resource="selfsubjectaccessreviews")
    assert writes([request, review]) == 1, "a review stores nothing: not a write"
    assert by_verb([review]) == {"review": 1}


def check_phases_split_at_the_write_that_made_the_rollout() -> None:
    """Rollout seen at 10.0 after a config write at 9.0 (monotonic; epoch = monotonic + 100). The
    controller's writes to the workload: one before the config write, a 409, the one that made it
    (received 109.3, answered 109.5), one answered after the rollout was seen. A CronJob's rollout
    has no write of its own and no phases."""
    cm = ConfigKey("ConfigMap", "ns", "a")
    app, cron = WorkloadKey("Deployment", "ns", "app"), WorkloadKey("CronJob", "ns", "job")
    log = WriteLog()
    log.entries[cm] += [(9.0, True)]
    patch = Request("patch", "deployments", 200, 0.0, "", 0.0, "ns", "app")
    audited = [
        replace(patch, at=108.0, done=108.1),
        replace(patch, at=109.1, done=109.2, code=409),
        replace(patch, at=109.3, done=109.5),
        replace(patch, at=109.9, done=110.2),
        replace(patch, at=109.4, done=109.6, name="other"),
        replace(patch, verb="create", resource="events", at=109.6, done=109.7),
    ]
    timed = timed_rollouts({app: [10.0], cron: [10.0]}, {app: {cm}, cron: {cm}}, log)
    split = phases(timed, audited, wall_offset=100.0)
    assert [round(v, 3) for v in split.reaction] == [0.3], split
    assert [round(v, 3) for v in split.server] == [0.2], split
    complete = {**json.loads(_AUDITED), "stageTimestamp": "2026-01-01T00:00:00.750000Z"}
    parsed = parse_event(json.dumps(complete))
    assert parsed is not None
    assert round(parsed[2].done - parsed[2].at, 3) == 0.25, parsed


def check_floor_finds_every_reference_shape() -> None:
    spec = cluster.pod_spec(
        [cluster.container(**cluster.key_env(ConfigKey("Secret", "n", "s1"), "k"))],
        init_containers=[cluster.container(**cluster.env_from(ConfigKey("ConfigMap", "n", "c1")))],
        volumes=[
            cluster.volume(ConfigKey("Secret", "n", "s2")),
            cluster.projected([ConfigKey("ConfigMap", "n", "c2"), ConfigKey("Secret", "n", "s3")]),
        ],
    )
    found = set(floor.referenced(spec))
    expected = {("Secret", "s1"), ("ConfigMap", "c1"), ("Secret", "s2")}
    assert found == expected | {("ConfigMap", "c2"), ("Secret", "s3")}, found


STAKATER_LIKE = (
    "KUBERNETES_NAMESPACE={namespace} R {namespaces_flag} --reload-strategy={reload_strategy}"
    " :{metrics_port}"
)


def _run(contender: str, round_: int, latencies: list[float]) -> RunResult:
    return RunResult(
        scenario="S3", contender=contender, expected=1, actual=1, mismatched=[],
        latencies=latencies, requests={}, run_requests={}, failed_requests={},
        startup_writes=0, peak_rss=0, steady_rss=0, cpu_seconds=0.0, ready_seconds=0.0,
        wall_seconds=0.0, rss_series=[], notes={}, log="", round=round_,
    )  # fmt: skip


def check_floor_target_pools_the_rounds() -> None:
    """One slow round out of three: the pooled p99 is that of all 300 writes, not of one run."""
    quick, slow = [0.01] * 100, [0.01] * 90 + [0.1] * 10
    results = [
        _run("reloader", 1, quick), _run("floor", 1, quick),
        _run("reloader", 2, slow), _run("floor", 2, quick),
        _run("reloader", 3, quick), _run("floor", 3, quick),
    ]  # fmt: skip
    target = report.targets(results, [], ours="reloader", vs=None)[1]
    assert target.met is False, target
    assert "rounds 1.00x 10.00x 1.00x" in target.measured, target.measured
    results[2] = _run("reloader", 2, [0.01] * 98 + [0.1] * 2)
    target = report.targets(results, [], ours="reloader", vs=None)[1]
    assert target.met is True, target.measured
    assert "S3 1.00x" in target.measured, target.measured
    assert [report.run_label(r) for r in results[:3]] == ["S3", "S3", "S3 #2"]


def check_commands_render() -> None:
    values = {
        "python": "py",
        "kubeconfig": "/k",
        "namespaces": "a,b",
        "metrics_port": "1",
        "controller_namespace": "c",
        "debounce": "0",
        "reload_strategy": "annotations",
    }
    assert "--namespaces=a,b" in render(OURS.command, values)
    launch = Launch(kubeconfig=Path("/k"), namespaces=("a", "b"), controller_namespace="c")
    stakater = Contender("stakater", STAKATER_LIKE, "/metrics", "edge", port=9090)
    scoped = RunningController(stakater, launch, Path("/dev/null"), 0.0).argv()[-1]
    assert scoped == "KUBERNETES_NAMESPACE=a R --namespaces=a,b --reload-strategy=annotations :9090"
    wide = replace(launch, namespaces=())
    assert RunningController(stakater, wide, Path("/dev/null"), 0.0).argv()[-1] == (
        "KUBERNETES_NAMESPACE= R  --reload-strategy=annotations :9090"
    )
    message = ""
    try:
        render("x {nope}", values)
    except SystemExit as error:
        message = str(error)
    assert "nope" in message, "an unknown placeholder must be refused"


def check_scale_objects_keep_configs_beside_their_deployment() -> None:
    sizes = scale.ScaleSizes(configmaps=10, secrets=7, deployments=3, namespaces=2, kib=1)
    items = list(scale.objects(sizes))
    assert len(items) == sizes.objects
    deployments = [body for path, body in items if path.endswith("/deployments")]
    assert len(deployments) == 3
    names = {path.split("/")[4] + "/" + body["metadata"]["name"] for path, body in items}
    for path, body in items:
        if not path.endswith("/deployments"):
            continue
        namespace = path.split("/")[5]
        for ref in body["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
            name = next(iter(ref.values()))["name"]
            assert f"{namespace}/{name}" in names, (namespace, name)


def check_scenario_table() -> None:
    ids = [s.id for s in scenarios(SIZES)]
    assert ids == [f"S{i}" for i in range(1, 14)], ids
    quick = [s.id for s in scenarios(QUICK_SIZES) if s.quick]
    assert {"S1", "S4", "S6"} <= set(quick)


def check_run_queue_wait_grows_when_threads_outnumber_cores() -> None:
    """More spinning threads than cores: some of them wait for a CPU, and the count says so."""
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        return  # not Linux: the bench reports 0
    stop = time.monotonic() + 0.5
    block = bytes(1 << 20)

    def spin() -> None:  # hashing a large buffer lets go of the GIL: the threads run at once
        while time.monotonic() < stop:
            hashlib.sha256(block).digest()

    before = run_queue_seconds(os.getpid())
    threads = [threading.Thread(target=spin) for _ in range((os.cpu_count() or 1) + 2)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)  # counted while the spinners are alive: an ended thread takes its count
    during = run_queue_seconds(os.getpid())
    for thread in threads:
        thread.join()
    assert during > before, (before, during)


CHECKS: list[Callable[[], None]] = [
    check_percentile_is_nearest_rank,
    check_latency_uses_latest_timed_write_before_rollout,
    check_signature_sees_template_changes_only,
    check_audit_event_parsing_and_counting,
    check_phases_split_at_the_write_that_made_the_rollout,
    check_floor_finds_every_reference_shape,
    check_commands_render,
    check_scale_objects_keep_configs_beside_their_deployment,
    check_scenario_table,
    check_floor_target_pools_the_rounds,
    check_run_queue_wait_grows_when_threads_outnumber_cores,
]


def main() -> None:
    for check in CHECKS:
        check()
        print(f"ok  {check.__name__}")


if __name__ == "__main__":
    main()
