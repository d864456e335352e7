"""Events: off the workers' path, deduplicated and aggregated (``reloader/events.py``).

The correlator is pure and runs on a fake clock. Everything else runs against the real API server
and reads the Events the server holds. Two faults a real server cannot produce on demand are
injected on the client side: an Event endpoint that answers slowly (``slow_event_writes``), to
show a worker never waits for one and that shutdown flushes what is queued. A server that refuses
Events is real: a ServiceAccount whose Role lacks them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import pytest

from reloader.annotations import DEFAULT_NAMES
from reloader.events import (
    COMBINED,
    SIMILAR_BEFORE_COMBINING,
    SPAM_BURST,
    WINDOW,
    Correlator,
    EventRecorder,
    EventType,
    Subject,
)
from reloader.kube import Api, connect_with_dict
from reloader.metrics import Metrics
from reloader.model import EVENTS
from reloader.permissions import Permission
from tests.conftest import TestCluster
from tests.scenario import Cluster, container, deployment, env_from, wait_for
from tests.test_manifests import service_account_api, wait_allowed
from tests.test_restart import RBAC, role_rules

AUTO = {DEFAULT_NAMES.auto: "true"}
NORMAL_LATENCY = 5.0
"""Seconds within which a restart shows (debounce 0.2 s, then one patch)."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def subject(name: str = "web") -> Subject:
    return Subject("apps/v1", "Deployment", "ns", name, f"uid-{name}")


# --- the correlator, on a fake clock ------------------------------------------------------------


def test_a_repeat_within_the_window_counts_towards_the_same_event() -> None:
    clock = FakeClock()
    correlator = Correlator(clock=clock)
    first = correlator.observe(subject(), type="Normal", reason="Reloaded", message="m")
    clock.now += WINDOW - 1
    again = correlator.observe(subject(), type="Normal", reason="Reloaded", message="m")
    assert again is first
    assert (again.count, again.first, again.last) == (2, clock.now - WINDOW + 1, clock.now)
    clock.now += WINDOW + 1
    later = correlator.observe(subject(), type="Normal", reason="Reloaded", message="m")
    assert later is not first and later.count == 1, "after a quiet window an Event starts over"


def test_events_differing_in_object_type_reason_or_message_are_separate() -> None:
    correlator = Correlator(clock=FakeClock())
    cases: list[tuple[Subject, EventType, str, str]] = [
        (subject("a"), "Normal", "Reloaded", "m"),
        (subject("b"), "Normal", "Reloaded", "m"),
        (subject("a"), "Warning", "Reloaded", "m"),
        (subject("a"), "Normal", "ReloadDeferred", "m"),
        (subject("a"), "Normal", "Reloaded", "other"),
    ]
    seen = {id(correlator.observe(s, type=t, reason=r, message=m)) for s, t, r, m in cases}
    assert len(seen) == 5


def test_many_different_messages_are_combined_into_one_event() -> None:
    clock = FakeClock()
    correlator = Correlator(clock=clock)
    apart = [
        correlator.observe(subject(), type="Warning", reason="ReloadFail", message=f"error {i}")
        for i in range(SIMILAR_BEFORE_COMBINING)
    ]
    assert [s.message for s in apart] == [f"error {i}" for i in range(SIMILAR_BEFORE_COMBINING)]
    combined = correlator.observe(subject(), type="Warning", reason="ReloadFail", message="x")
    more = correlator.observe(subject(), type="Warning", reason="ReloadFail", message="y")
    assert more is combined and more.count == 2
    assert more.message == COMBINED + "y"
    known = correlator.observe(subject(), type="Warning", reason="ReloadFail", message="error 3")
    assert known is apart[3] and known.count == 2, "a message seen before keeps its own Event"
    clock.now += WINDOW + 1
    fresh = correlator.observe(subject(), type="Warning", reason="ReloadFail", message="z")
    assert fresh.message == "z", "the window passed: messages stand alone again"


def test_the_spam_filter_limits_writes_per_object_and_refills() -> None:
    clock = FakeClock()
    correlator = Correlator(clock=clock)
    assert all(correlator.allow(subject("a")) for _ in range(SPAM_BURST))
    assert not correlator.allow(subject("a"))
    assert correlator.allow(subject("b")), "another object has its own budget"
    clock.now += 300
    assert correlator.allow(subject("a")) and not correlator.allow(subject("a"))


def test_what_the_correlator_remembers_is_bounded() -> None:
    correlator = Correlator(clock=FakeClock(), tracked=3)
    first = correlator.observe(subject("0"), type="Normal", reason="R", message="m")
    for i in range(1, 5):
        correlator.observe(subject(str(i)), type="Normal", reason="R", message="m")
        correlator.allow(subject(str(i)))
    again = correlator.observe(subject("0"), type="Normal", reason="R", message="m")
    assert again is not first and again.count == 1, "the oldest Event was forgotten"


# --- the recorder against the real server -------------------------------------------------------


async def reloader_events(scene: Cluster, name: str) -> list[dict[str, Any]]:
    """The Events the controller wrote about workload ``name``, as the server has them."""
    page = await scene.api.list_page(EVENTS.collection_path(scene.namespace), params=[])
    return [
        e
        for e in page.get("items", [])
        if e["involvedObject"].get("name") == name
        and (e.get("source") or {}).get("component") == "reloader"
    ]


def only(events: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    found = [e for e in events if e["reason"] == reason]
    assert len(found) == 1, f"{len(found)} {reason} Events: {[e['message'] for e in found]}"
    return found[0]


async def slow_event_writes(cluster: TestCluster, scene: Cluster, delay: float) -> Api:
    """An admin client whose Event writes take ``delay`` seconds longer.

    A fault injected on the client side: a real server cannot be made slow for Events alone (as
    one under load, or behind a slow admission webhook, is). Everything else goes through as is.
    """
    api = await connect_with_dict(cluster.kubeconfig)
    scene.apis.append(api)
    create, patch = api.create, api.patch

    async def slow_create(path: str, body: Any) -> Any:
        if path.endswith("/events"):
            await asyncio.sleep(delay)
        return await create(path, body)

    async def slow_patch(path: str, body: Any, *, patch_type: Any) -> Any:
        if "/events/" in path:
            await asyncio.sleep(delay)
        return await patch(path, body, patch_type=patch_type)

    api.create = slow_create  # type: ignore[method-assign]
    api.patch = slow_patch  # type: ignore[method-assign,assignment]
    return api


async def web_on_secret(scene: Cluster, name: str = "web") -> None:
    await scene.create_secret("db", {"password": "0"})
    containers = [container(**env_from("Secret", "db"))]
    await scene.create_workload(deployment(name, annotations=AUTO, containers=containers))


@pytest.mark.cluster
async def test_a_restart_writes_one_reloaded_event_naming_the_config(scene: Cluster) -> None:
    await web_on_secret(scene)
    await scene.start_controller()
    await scene.wait_recorded("web")
    await scene.set_secret("db", {"password": "1"})
    await scene.wait_marker("Deployment", "web")
    await wait_for(lambda: reloader_events(scene, "web"), message="a Reloaded Event")
    await asyncio.sleep(1.0)  # a second Event would show here

    events = await reloader_events(scene, "web")
    reloaded = only(events, "Reloaded")
    assert len(events) == 1, [e["reason"] for e in events]
    uid = (await scene.get_deployment("web"))["metadata"]["uid"]
    assert reloaded["involvedObject"]["uid"] == uid
    assert (reloaded["type"], reloaded["count"]) == ("Normal", 1)
    assert "Secret/db" in reloaded["message"]


async def generation(scene: Cluster, name: str) -> int:
    """The Deployment's ``metadata.generation``: one more for every change of its spec."""
    return int((await scene.get_workload("Deployment", name))["metadata"]["generation"])


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_a_flapping_secret_raises_counts_instead_of_creating_events(scene: Cluster) -> None:
    """20 changes under a 2 s minimum interval: a few restarts, each deferral a Normal Event.
    Before, every restart was a new Event object (and deferrals left none). Now one Reloaded
    Event whose count is the number of rollouts the server made, one ReloadDeferred counted up."""
    await web_on_secret(scene)
    await scene.start_controller(min_restart_interval_seconds=2)
    await scene.wait_recorded("web")
    before, started = await generation(scene, "web"), time.monotonic()
    for value in range(1, 21):
        await scene.set_secret("db", {"password": str(value)})
        await asyncio.sleep(0.25)
    await asyncio.sleep(2.5)  # the last deferred restart happens after the interval
    elapsed = time.monotonic() - started

    async def settled() -> list[dict[str, Any]] | None:
        # Rollouts as the server counts template changes (``generation``), not ReplicaSets: on a
        # busy machine the Deployment controller can skip a template that was replaced before it
        # got to it, and then two restarts leave one ReplicaSet.
        rollouts = await generation(scene, "web") - before
        events = await reloader_events(scene, "web")
        counted = sum(e["count"] for e in events if e["reason"] == "Reloaded")
        return events if rollouts >= 2 and counted == rollouts else None

    events = await wait_for(settled, timeout=20, message="one Reloaded count per rollout")
    assert len(events) <= 3, [(e["reason"], e["message"]) for e in events]
    reloaded, deferred = only(events, "Reloaded"), only(events, "ReloadDeferred")
    assert reloaded["count"] >= 2 and "Secret/db" in reloaded["message"]
    assert reloaded["count"] <= 2 + elapsed // 2, "restarts closer than the minimum interval"
    assert deferred["count"] >= 2 and deferred["type"] == "Normal"
    assert "minimum restart interval" in deferred["message"]


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_one_held_back_restart_is_one_deferral_event_however_often_the_config_flaps(
    scene: Cluster,
) -> None:
    """A restart, then ten changes inside a 6 s minimum interval: one restart held back, so one
    ReloadDeferred written once (count 1). Before, every one of the ten syncs raised its count,
    one PATCH each. The held-back restart then happens, once."""
    await web_on_secret(scene)
    await scene.start_controller(min_restart_interval_seconds=6, debounce_seconds=0.05)
    await scene.wait_recorded("web")
    await scene.set_secret("db", {"password": "first"})
    await scene.assert_replica_sets_stay("web", 2, quiet=0.5)
    for value in range(10):
        await scene.set_secret("db", {"password": f"flap-{value}"})
        await asyncio.sleep(0.2)

    async def deferred_once() -> list[dict[str, Any]] | None:
        events = await reloader_events(scene, "web")
        return events if any(e["reason"] == "ReloadDeferred" for e in events) else None

    events = await wait_for(deferred_once, timeout=10, message="a ReloadDeferred Event")
    await asyncio.sleep(1.0)  # the recorder writes in the background: let any repeat land
    events = await reloader_events(scene, "web")
    assert only(events, "ReloadDeferred")["count"] == 1, events
    await scene.assert_replica_sets_stay("web", 3, quiet=2)


@pytest.mark.cluster
async def test_workers_do_not_wait_for_slow_event_writes(
    cluster: TestCluster, scene: Cluster
) -> None:
    """One worker, two workloads on one config, Event writes taking 3 s: both restart at once.
    Before, the worker wrote the first workload's Event before the second could restart."""
    api = await slow_event_writes(cluster, scene, delay=3.0)
    await web_on_secret(scene, "a")
    containers = [container(**env_from("Secret", "db"))]
    await scene.create_workload(deployment("b", annotations=AUTO, containers=containers))
    await scene.start_controller(api=api, workers=1)
    await scene.wait_recorded("a")
    await scene.wait_recorded("b")

    started = time.monotonic()
    await scene.set_secret("db", {"password": "1"})
    await scene.wait_marker("Deployment", "a")
    await scene.wait_marker("Deployment", "b")
    assert time.monotonic() - started < 2.5, "a restart waited for an Event write"
    for name in ("a", "b"):
        events = await wait_for(partial(reloader_events, scene, name), message="Events")
        assert only(events, "Reloaded")["count"] == 1


@pytest.mark.cluster
async def test_shutdown_flushes_a_pending_event(cluster: TestCluster, scene: Cluster) -> None:
    api = await slow_event_writes(cluster, scene, delay=1.0)
    await web_on_secret(scene)
    await scene.start_controller(api=api)
    await scene.wait_recorded("web")
    await scene.set_secret("db", {"password": "1"})
    await scene.wait_marker("Deployment", "web")
    await scene.stop_controllers()  # the Event is still being written
    assert only(await reloader_events(scene, "web"), "Reloaded")["count"] == 1


@pytest.mark.cluster
async def test_shutdown_does_not_wait_long_for_events(cluster: TestCluster, scene: Cluster) -> None:
    """An Event write that takes longer than the flush deadline is dropped, counted, at stop."""
    api = await slow_event_writes(cluster, scene, delay=20.0)
    await web_on_secret(scene)
    controller = await scene.start_controller(api=api)
    await scene.wait_recorded("web")
    await scene.set_secret("db", {"password": "1"})
    await scene.wait_marker("Deployment", "web")
    started = time.monotonic()
    await scene.stop_controllers()
    assert time.monotonic() - started < 10.0
    dropped = controller.metrics.registry.get_sample_value(
        "reloader_events_dropped_total", {"reason": "shutdown"}
    )
    assert dropped == 1.0
    assert not await reloader_events(scene, "web")


async def account_without_events(cluster: TestCluster, scene: Cluster) -> Api:
    """A ServiceAccount that may do everything a restart needs except write Events."""
    namespace = scene.namespace
    accounts = f"/api/v1/namespaces/{namespace}/serviceaccounts"
    await scene.api.create(accounts, {"metadata": {"name": "quiet"}})
    rules = [r for r in role_rules(patch_deployments=True) if r["resources"] != ["events"]]
    role = {"metadata": {"name": "quiet"}, "rules": rules}
    binding = {
        "metadata": {"name": "quiet"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "quiet"},
        "subjects": [{"kind": "ServiceAccount", "name": "quiet", "namespace": namespace}],
    }
    await scene.api.create(f"{RBAC}/namespaces/{namespace}/roles", role)
    await scene.api.create(f"{RBAC}/namespaces/{namespace}/rolebindings", binding)
    api = await service_account_api(
        scene.api, cluster.kubeconfig, namespace=namespace, name="quiet"
    )
    scene.apis.append(api)
    await wait_allowed(api, [Permission("apps", "deployments", "patch")], namespace=namespace)
    return api


@pytest.mark.cluster
async def test_refused_events_are_counted_and_logged_once_and_restarts_go_on(
    cluster: TestCluster, scene: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Three restarts as an account that may not create Events: each restarts as fast as usual,
    each refused Event is counted, and one log line says so (before: one line per Event)."""
    api = await account_without_events(cluster, scene)
    await web_on_secret(scene)
    controller = await scene.start_controller(api=api, workers=1)
    await scene.wait_recorded("web")
    marker = None
    with caplog.at_level(logging.WARNING, logger="reloader"):
        for value in range(1, 4):
            started = time.monotonic()
            await scene.set_secret("db", {"password": str(value)})
            marker = await scene.wait_marker("Deployment", "web", other_than=marker)
            assert time.monotonic() - started < NORMAL_LATENCY

        def failed() -> float | None:
            return controller.metrics.registry.get_sample_value(
                "reloader_events_dropped_total", {"reason": "write_failed"}
            )

        async def all_failed() -> bool:
            return failed() == 3.0

        await wait_for(all_failed, message="three refused Event writes counted")
    assert api.statistics().requests.get(("POST", "403"), 0) == 3, "a 403 was retried"
    logged = [r for r in caplog.records if "event" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    await scene.wait_replica_sets("web", 4)


@pytest.mark.cluster
async def test_a_restart_of_a_paused_deployment_leaves_a_warning(scene: Cluster) -> None:
    """Paused by someone else, the Deployment takes the new template but rolls nothing until it
    is resumed: the restart says so with a Warning (before: only a Reloaded Event)."""
    await scene.create_secret("db", {"password": "0"})
    body = deployment("web", annotations=AUTO, containers=[container(**env_from("Secret", "db"))])
    body["spec"]["paused"] = True
    await scene.create_workload(body)
    await scene.start_controller()
    await scene.wait_recorded("web")
    await scene.set_secret("db", {"password": "1"})
    await scene.wait_marker("Deployment", "web")

    async def postponed() -> list[dict[str, Any]]:
        return [e for e in await reloader_events(scene, "web") if e["reason"] == "ReloadPostponed"]

    warning = (await wait_for(postponed, message="a ReloadPostponed Event"))[0]
    assert warning["type"] == "Warning" and "Secret/db" in warning["message"]


@pytest.mark.cluster
async def test_a_full_queue_drops_new_events_without_waiting(admin_api: Api) -> None:
    """No writer runs: the queue fills to its capacity, then each new Event is dropped and
    counted at once; repeats of a queued Event cost nothing."""
    metrics = Metrics()
    recorder = EventRecorder(api=admin_api, metrics=metrics, capacity=3)
    for i in range(5):
        recorder.emit(subject(str(i)), reason="Reloaded", message="m", warning=False)
    recorder.emit(subject("0"), reason="Reloaded", message="m", warning=False)
    assert recorder.pending == 3
    dropped = metrics.registry.get_sample_value(
        "reloader_events_dropped_total", {"reason": "queue_full"}
    )
    assert dropped == 2.0


@pytest.mark.cluster
async def test_events_queued_in_an_ended_leader_term_are_dropped(
    admin_api: Api, namespace: str
) -> None:
    """With ``--enable-ha`` a standby never writes: an Event still queued when the term ended is
    dropped and counted; once this replica leads again, Events are written."""
    leading = False
    metrics = Metrics()
    recorder = EventRecorder(api=admin_api, metrics=metrics, may_write=lambda: leading)
    writer = asyncio.create_task(recorder.run())
    web = Subject("apps/v1", "Deployment", namespace, "web", "uid-web")
    recorder.emit(web, reason="Reloaded", message="queued as standby", warning=False)

    async def dropped() -> bool:
        value = metrics.registry.get_sample_value(
            "reloader_events_dropped_total", {"reason": "not_leader"}
        )
        return value == 1.0

    await wait_for(dropped, timeout=10, message="the standby's Event dropped")
    leading = True
    recorder.emit(web, reason="Reloaded", message="written as leader", warning=False)
    await recorder.close(writer)
    page = await admin_api.list_page(EVENTS.collection_path(namespace), params=[])
    assert [event["message"] for event in page.get("items") or []] == ["written as leader"]
