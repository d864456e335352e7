"""Webhook mode (``--webhook-url``) and alerts (``ALERT_*``) against a real HTTP endpoint.

The endpoint is an aiohttp server on 127.0.0.1 started by the test; the controller runs against
the real API server. Evidence of a restart (or of none) is the server's: the pod template and
the Deployment's ReplicaSets. The pure parts (payloads, message, sink rules) are tested without
either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from reloader.model import RECORD_ANNOTATION
from reloader.notify import (
    Reload,
    accepted,
    alert_message,
    alert_request,
    delivery_id,
    sink_of,
    webhook_payload,
)
from reloader.settings import SettingsError, load_settings
from tests.scenario import Cluster, container, deployment, env_from, wait_for

AUTO = {"reloader.stakater.com/auto": "true"}
TOKEN = "T0KEN-s3cr3t-path-part"
"""Stands for the token a Slack or Teams URL carries in its path: it must never be logged."""


@dataclass
class Endpoint:
    """A local HTTP endpoint that records every request and answers ``answers`` in turn (then
    200), or hangs until the test ends when ``hang`` is set."""

    answers: list[int] = field(default_factory=list)
    hang: bool = False
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    url: str = ""
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.content_type, await request.read()))
        if self.hang:
            await self.released.wait()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, _, body in self.requests]


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    found = Endpoint()
    app = web.Application()
    app.router.add_post("/{tail:.*}", found.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/hooks/{TOKEN}"
    yield found
    found.released.set()
    await runner.cleanup()


def _reload(*configs: str) -> Reload:
    return Reload("Deployment", "shop", "web", configs, "id-1")


# --- pure: payloads and rules ----------------------------------------------------------------


def test_webhook_payload_keeps_stakaters_body_and_names_the_reload() -> None:
    body = webhook_payload(_reload("ConfigMap/app", "Secret/db"))
    assert body == {
        "webhook": "update successful",
        "id": "id-1",
        "kind": "Deployment",
        "namespace": "shop",
        "name": "web",
        "configs": [
            {"kind": "ConfigMap", "name": "app", "namespace": "shop"},
            {"kind": "Secret", "name": "db", "namespace": "shop"},
        ],
    }


def test_alert_message_is_stakaters_sentence_with_additional_info_first() -> None:
    assert alert_message(_reload("ConfigMap/app"), additional_info="prod-eu") == (
        "prod-eu : Reloader detected changes in *app* of type *CONFIGMAP* in namespace *shop*. "
        "Hence reloaded *web* of type *Deployment* in namespace *shop*"
    )


@pytest.mark.parametrize(
    ("sink", "body", "content_type"),
    [
        pytest.param(
            "slack",
            {"attachments": [{"text": "*a* b", "color": "good", "author_name": "Reloader"}]},
            "application/json",
            id="slack",
        ),
        pytest.param("teams", {"text": "*a* b"}, "application/json", id="teams"),
        pytest.param("gchat", {"text": "*a* b"}, "application/json", id="gchat"),
        pytest.param("webhook", "a b", "text/plain", id="raw-without-stars"),
    ],
)
def test_alert_request_per_sink(sink: str, body: object, content_type: str) -> None:
    data, found_type = alert_request(sink_of(sink), "*a* b")
    assert found_type == content_type
    assert (orjson.loads(data) if content_type == "application/json" else data.decode()) == body


def test_teams_and_gchat_accept_only_200_others_any_answer_below_400() -> None:
    assert not accepted("teams", 204)
    assert not accepted("gchat", 202)
    assert accepted("slack", 204)
    assert not accepted("slack", 400)
    assert not accepted("webhook", 500)


def test_delivery_id_is_stable_for_one_reload_and_differs_for_the_next() -> None:
    one = delivery_id(uid="u", workload="Deployment/ns/web", digests=(("ConfigMap/a", "1"),))
    again = delivery_id(uid="u", workload="Deployment/ns/web", digests=(("ConfigMap/a", "1"),))
    other = delivery_id(uid="u", workload="Deployment/ns/web", digests=(("ConfigMap/a", "2"),))
    assert one == again != other


def test_a_url_that_is_not_http_stops_the_start_without_repeating_it() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings([f"--webhook-url=ftp://hooks.invalid/{TOKEN}"])
    assert "webhook_url" in str(raised.value)
    assert TOKEN not in str(raised.value)


def test_stakater_alert_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_ON_RELOAD", "true")
    monkeypatch.setenv("ALERT_SINK", "teams")
    monkeypatch.setenv("ALERT_WEBHOOK_URL", f"https://hooks.invalid/{TOKEN}")
    monkeypatch.setenv("ALERT_ADDITIONAL_INFO", "prod")
    settings = load_settings([])
    assert settings.alert_on_reload
    assert (settings.alert_sink, settings.alert_additional_info) == ("teams", "prod")
    assert settings.alert_webhook_url is not None
    assert settings.alert_webhook_url.get_secret_value().endswith(TOKEN)
    assert TOKEN not in repr(settings)


# --- against the real API server and a real HTTP endpoint ------------------------------------


async def _web(scene: Cluster, name: str, config: str) -> None:
    await scene.create_configmap(config, {"k": "1"})
    containers = [container(**env_from("ConfigMap", config))]
    await scene.create_workload(deployment(name, annotations=AUTO, containers=containers))
    await scene.wait_recorded(name)


async def _requests(endpoint: Endpoint, count: int, *, timeout: float = 30) -> None:
    async def enough() -> bool:
        return len(endpoint.requests) >= count

    await wait_for(enough, timeout=timeout, message=f"{count} requests to the endpoint")


@pytest.mark.cluster
async def test_webhook_mode_posts_the_reload_instead_of_restarting(
    scene: Cluster, endpoint: Endpoint
) -> None:
    """1. Webhook mode; an auto Deployment reads ConfigMap cfg; first sight posts nothing.
    2. cfg changes.
    Result: one POST with Stakater's body plus the reload's description; the record is updated
    (so the change is not sent again); the pod template and ReplicaSets are untouched. The POST
    is the proof that the controller acted on the change it did not restart for.
    """
    await scene.start_controller(webhook_url=endpoint.url)
    await _web(scene, "web", "cfg")
    assert endpoint.requests == []
    recorded = (await scene.get_deployment("web"))["metadata"]["annotations"][RECORD_ANNOTATION]

    async def change() -> None:
        await scene.patch_configmap("cfg", {"data": {"k": "2"}})
        await _requests(endpoint, 1)

    await scene.assert_not_restarted("web", change)
    ((path, content_type, _),) = endpoint.requests
    assert (path, content_type) == (f"/hooks/{TOKEN}", "application/json")
    body = endpoint.bodies()[0]
    assert body["webhook"] == "update successful"
    assert {k: body[k] for k in ("kind", "namespace", "name")} == {
        "kind": "Deployment",
        "namespace": scene.namespace,
        "name": "web",
    }
    assert body["configs"] == [{"kind": "ConfigMap", "name": "cfg", "namespace": scene.namespace}]
    now = (await scene.get_deployment("web"))["metadata"]["annotations"][RECORD_ANNOTATION]
    assert now != recorded, "the reload sent was not recorded: it would be sent again"
    assert len(endpoint.requests) == 1


@pytest.mark.cluster
async def test_webhook_retries_after_500_until_accepted_with_one_delivery_id(
    scene: Cluster, endpoint: Endpoint
) -> None:
    """1. The endpoint answers 500 twice, then 200.
    2. A config change.
    Result: three POSTs of the same delivery id, then none (the accepted one was recorded)."""
    endpoint.answers = [500, 500]
    await scene.start_controller(webhook_url=endpoint.url)
    await _web(scene, "web", "cfg")
    await scene.patch_configmap("cfg", {"data": {"k": "2"}})
    await _requests(endpoint, 3)
    await asyncio.sleep(2)
    ids = {body["id"] for body in endpoint.bodies()}
    assert len(endpoint.requests) == 3
    assert len(ids) == 1


@pytest.mark.cluster
async def test_hanging_webhook_leaves_workers_for_other_workloads(
    scene: Cluster, endpoint: Endpoint
) -> None:
    """1. Webhook mode, two workers (so one delivery slot); the endpoint never answers.
    2. Two configs change: one delivery hangs, the other waits for the slot, not in a worker.
    3. A new opted-in Deployment appears.
    Result: it is recorded at once; without the slot limit both workers would hang for the
    timeout (20 s) and the record would wait for it."""
    endpoint.hang = True
    await scene.start_controller(webhook_url=endpoint.url, workers=2, notify_timeout_seconds=20)
    await _web(scene, "a", "cfg-a")
    await _web(scene, "b", "cfg-b")
    await scene.patch_configmap("cfg-a", {"data": {"k": "2"}})
    await scene.patch_configmap("cfg-b", {"data": {"k": "2"}})
    await _requests(endpoint, 1)
    await asyncio.sleep(1)
    started = time.monotonic()
    await _web(scene, "c", "cfg-c")
    assert time.monotonic() - started < 8, "a record waited behind a hanging webhook"
    assert len(endpoint.requests) == 1


@pytest.mark.cluster
async def test_alert_after_each_restart_in_the_sinks_shape(
    scene: Cluster, endpoint: Endpoint
) -> None:
    """1. Alerts to a Slack sink with additional info.
    2. A config change restarts the Deployment.
    Result: one Slack attachment with Stakater's sentence, sent after the restart."""
    await scene.start_controller(
        alert_on_reload=True,
        alert_sink="slack",
        alert_webhook_url=endpoint.url,
        alert_additional_info="cluster-x",
    )
    await _web(scene, "web", "cfg")
    sets = await scene.settled_replica_sets("web")
    await scene.patch_configmap("cfg", {"data": {"k": "2"}})
    await _requests(endpoint, 1)
    await scene.assert_replica_sets_stay("web", len(sets) + 1)
    ns = scene.namespace
    assert endpoint.bodies() == [
        {
            "attachments": [
                {
                    "text": f"cluster-x : Reloader detected changes in *cfg* of type *CONFIGMAP* "
                    f"in namespace *{ns}*. Hence reloaded *web* of type *Deployment* in "
                    f"namespace *{ns}*",
                    "color": "good",
                    "author_name": "Reloader",
                }
            ]
        }
    ]


@pytest.mark.cluster
async def test_hanging_alert_endpoint_does_not_delay_another_restart(
    scene: Cluster, endpoint: Endpoint
) -> None:
    """1. One worker; alerts go to an endpoint that never answers (timeout 20 s).
    2. cfg-a changes: a restarts, its alert hangs.
    3. cfg-b changes.
    Result: b restarts within seconds; an alert sent by the worker would hold it for 20 s."""
    endpoint.hang = True
    await scene.start_controller(
        workers=1, alert_on_reload=True, alert_webhook_url=endpoint.url, notify_timeout_seconds=20
    )
    await _web(scene, "a", "cfg-a")
    await _web(scene, "b", "cfg-b")
    before_a, before_b = (
        await scene.marker("Deployment", "a"),
        await scene.marker("Deployment", "b"),
    )
    await scene.patch_configmap("cfg-a", {"data": {"k": "2"}})
    await scene.wait_marker("Deployment", "a", other_than=before_a)
    await _requests(endpoint, 1)
    started = time.monotonic()
    await scene.patch_configmap("cfg-b", {"data": {"k": "2"}})
    await scene.wait_marker("Deployment", "b", other_than=before_b)
    assert time.monotonic() - started < 8, "a restart waited behind a hanging alert"


@pytest.mark.cluster
async def test_urls_never_reach_logs_or_metrics(
    scene: Cluster, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Webhook mode to a URL that refuses connections (nothing listens); every log level
    captured. A change: the webhook fails and is retried.
    2. That controller stops; one with alerts to an endpoint answering 500 starts: the change
    (never recorded) restarts the Deployment and its alert fails three times.
    Result: no log record (message or field) and no metric holds either URL, its host:port or
    the path token; both failures were logged, so the check read real failure lines."""
    caplog.set_level(logging.DEBUG, logger="reloader")
    closed = f"http://127.0.0.1:9/hooks/{TOKEN}"  # the discard port: nothing listens there
    registries = []
    controller = await scene.start_controller(webhook_url=closed)
    registries.append(controller.metrics.registry)
    await _web(scene, "web", "cfg")
    await scene.patch_configmap("cfg", {"data": {"k": "2"}})
    await wait_for(_logged(caplog, "webhook POST failed"), message="the webhook failure logged")
    await scene.stop_controllers()
    endpoint.answers = [500] * 3
    controller = await scene.start_controller(alert_on_reload=True, alert_webhook_url=endpoint.url)
    registries.append(controller.metrics.registry)
    await wait_for(_logged(caplog, "alert not sent"), message="the alert failure logged")
    assert len(endpoint.requests) == 3
    texts = [f"{r.getMessage()} {r.__dict__}" for r in caplog.records]
    texts += [generate_latest(registry).decode() for registry in registries]
    port = endpoint.url.split(":")[2].split("/")[0]
    for secret in (closed, endpoint.url, TOKEN, "127.0.0.1:9", f"127.0.0.1:{port}"):
        leaked = [text for text in texts if secret in text]
        assert not leaked, f"{secret!r} in {leaked[:2]}"


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], Awaitable[bool]]:
    async def found() -> bool:
        return any(text in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)

    return found
