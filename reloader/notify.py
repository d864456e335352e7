"""Webhook mode and reload alerts: HTTP POSTs to URLs the operator gives, which are secrets.

Two uses, both Stakater's:

- **Webhook mode** (``--webhook-url``): a reload is POSTed to the URL *instead of* patching the
  workload. ``deliver`` is awaited by the worker, one request with a timeout; a failure raises
  ``NotifyFailed`` and the work queue retries the key with its per-key backoff, so a failing
  endpoint costs that workload retries and never holds a worker longer than the timeout. At most
  ``webhook_slots`` deliveries are in flight (``webhook_saturated``), so the other workers stay
  free for records and pause resumes while the endpoint hangs.
- **Alerts** (``ALERT_ON_RELOAD``): after a restart was written, ``alert_nowait`` puts the message
  on a bounded queue and returns at once; sender tasks POST it to Slack, Teams, Google Chat or a
  raw endpoint, each with a timeout and a few attempts with backoff. A full queue drops the alert
  (counted and logged): an alert must never slow a restart down.

Guarantees about the URLs: they are never logged, never in a metric, an Event or an exception
message, not even their host (a Slack or Teams token lives in the path, but a private endpoint's
host names an internal system too). Failures are described by the sink kind, the HTTP status or
the exception's type name only: aiohttp's own messages name the host, so they are never used.

This module is not the API client (``kube.py`` is): it talks to third-party endpoints only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

log = logging.getLogger("reloader.notify")

Sink = Literal["slack", "teams", "gchat", "raw"]
Target = Literal["webhook", "alert"]
Outcome = Literal["sent", "failed", "dropped"]

WEBHOOK_BODY = {"webhook": "update successful"}
"""Stakater's fixed webhook body; ours keeps it and adds what was reloaded."""
ALERT_QUEUE_SIZE = 1000
ALERT_SENDERS = 2
ALERT_ATTEMPTS = 3
ALERT_BACKOFF = 1.0
"""Seconds before an alert's second attempt; doubled for each further one."""


def sink_of(name: str) -> Sink:
    """Stakater's ``ALERT_SINK``: slack, teams, gchat; anything else is a raw text endpoint."""
    lowered = name.strip().lower()
    return lowered if lowered in ("slack", "teams", "gchat") else "raw"  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Reload:
    """One reload, as a webhook or an alert describes it.

    ``configs`` are config ids (``ConfigMap/app``) in the workload's namespace. ``delivery_id`` is
    the same for every attempt at one reload (it hashes the workload's uid and the digests it is
    reloaded for), so a receiver can drop the duplicates that at-least-once delivery may send.
    """

    kind: str
    namespace: str
    name: str
    configs: tuple[str, ...]
    delivery_id: str


def delivery_id(*, uid: str, workload: str, digests: tuple[tuple[str, str], ...]) -> str:
    """Stable across retries of one reload; differs for the next change (other digests)."""
    text = "|".join([uid, workload, *(f"{ident}={digest}" for ident, digest in digests)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def webhook_payload(reload: Reload) -> dict[str, Any]:
    """Stakater's ``{"webhook": "update successful"}`` plus what was reloaded, and the id."""
    configs = []
    for ident in reload.configs:
        kind, _, name = ident.partition("/")
        configs.append({"kind": kind, "name": name, "namespace": reload.namespace})
    return {
        **WEBHOOK_BODY,
        "id": reload.delivery_id,
        "kind": reload.kind,
        "namespace": reload.namespace,
        "name": reload.name,
        "configs": configs,
    }


def alert_message(reload: Reload, *, additional_info: str = "") -> str:
    """Stakater's sentence; several configs coalesced into one restart are listed together."""
    changed = ", ".join(
        f"*{name}* of type *{kind.upper()}*"
        for kind, _, name in (ident.partition("/") for ident in reload.configs)
    )
    message = (
        f"Reloader detected changes in {changed} in namespace *{reload.namespace}*. "
        f"Hence reloaded *{reload.name}* of type *{reload.kind}* in namespace *{reload.namespace}*"
    )
    return f"{additional_info} : {message}" if additional_info else message


def alert_request(sink: Sink, message: str) -> tuple[bytes, str]:
    """(body, content type) in the shape each sink expects."""
    if sink == "slack":
        attachment = {"text": message, "color": "good", "author_name": "Reloader"}
        return orjson.dumps({"attachments": [attachment]}), "application/json"
    if sink in ("teams", "gchat"):
        return orjson.dumps({"text": message}), "application/json"
    return message.replace("*", "").encode(), "text/plain"


def accepted(sink: Sink | Target, status: int) -> bool:
    """Stakater's success rule: Teams and Google Chat answer exactly 200; others any 2xx/3xx."""
    if sink in ("teams", "gchat"):
        return status == 200
    return status < 400


class NotifyFailed(Exception):
    """A POST did not succeed. The message names the target and the status or the exception's
    type, never the URL. ``status`` is the HTTP answer, 0 when there was none."""

    def __init__(self, target: str, status: int, what: str) -> None:
        super().__init__(f"{target} POST failed: {what}")
        self.status = status


@dataclass(frozen=True, slots=True)
class AlertConfig:
    url: str
    sink: Sink
    proxy: str | None = None
    additional_info: str = ""


class Notifier:
    """Posts webhooks (awaited by a worker) and alerts (queued, sent in the background)."""

    def __init__(
        self,
        *,
        webhook_url: str | None,
        alerts: AlertConfig | None,
        timeout: float,
        webhook_slots: int,
        count: Callable[[Target, Outcome], None],
        queue_size: int = ALERT_QUEUE_SIZE,
        alert_backoff: float = ALERT_BACKOFF,
    ) -> None:
        self._webhook_url = webhook_url
        self._alerts = alerts
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._slots = asyncio.Semaphore(max(1, webhook_slots))
        self._count = count
        self._queue: asyncio.Queue[Reload] = asyncio.Queue(maxsize=queue_size)
        self._backoff = alert_backoff
        self._session: aiohttp.ClientSession | None = None

    @property
    def webhook_mode(self) -> bool:
        return self._webhook_url is not None

    def webhook_saturated(self) -> bool:
        """Every webhook slot is taken: the caller should come back later rather than wait."""
        return self._slots.locked()

    async def deliver(self, reload: Reload) -> None:
        """POST one reload to the webhook; raise ``NotifyFailed`` unless it was accepted."""
        assert self._webhook_url is not None
        body = orjson.dumps(webhook_payload(reload))
        async with self._slots:
            try:
                await self._post(self._webhook_url, body, "application/json", "webhook", None)
            except NotifyFailed:
                self._count("webhook", "failed")
                raise
        self._count("webhook", "sent")

    def alert_nowait(self, reload: Reload) -> None:
        """Queue an alert for ``reload`` if alerts are on; never waits (full: dropped)."""
        if self._alerts is None:
            return
        try:
            self._queue.put_nowait(reload)
        except asyncio.QueueFull:
            self._count("alert", "dropped")
            log.warning("alert queue full; alert dropped", extra=_describe(reload))

    async def run(self) -> None:
        """The alert senders, until cancelled; owned by the controller's task group."""
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(ALERT_SENDERS if self._alerts is not None else 0):
                    group.create_task(self._send_alerts())
                await asyncio.Event().wait()  # the senders never end; cancelling ends this
        finally:
            if self._session is not None:
                await self._session.close()

    async def wait_flushed(self) -> None:
        """Until every queued alert was sent or given up on; at shutdown, under a time limit."""
        await self._queue.join()

    async def _send_alerts(self) -> None:
        while True:
            reload = await self._queue.get()
            try:
                await self._send_alert(reload)
            finally:
                self._queue.task_done()

    async def _send_alert(self, reload: Reload) -> None:
        """Up to ``ALERT_ATTEMPTS`` tries with doubling pauses; failures are logged, not raised."""
        config = self._alerts
        assert config is not None
        message = alert_message(reload, additional_info=config.additional_info)
        body, content_type = alert_request(config.sink, message)
        for attempt in range(ALERT_ATTEMPTS):
            try:
                await self._post(config.url, body, content_type, config.sink, config.proxy)
            except NotifyFailed as error:
                if attempt + 1 < ALERT_ATTEMPTS:
                    await asyncio.sleep(self._backoff * 2**attempt)
                    continue
                self._count("alert", "failed")
                log.warning(
                    "alert not sent", extra=_describe(reload, sink=config.sink, error=str(error))
                )
                return
            self._count("alert", "sent")
            log.debug("alert sent", extra=_describe(reload, sink=config.sink))
            return

    async def _post(
        self, url: str, body: bytes, content_type: str, sink: Sink | Target, proxy: str | None
    ) -> None:
        """One POST, no redirects followed (a redirect could carry the body elsewhere)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        target = "webhook" if sink == "webhook" else f"{sink} alert"
        try:
            async with self._session.post(
                url,
                data=body,
                headers={"Content-Type": content_type},
                proxy=proxy,
                allow_redirects=False,
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            raise NotifyFailed(target, 0, "no answer within the timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as error:
            # str(error) names the host (and for a bad URL, the URL): only the type is kept.
            raise NotifyFailed(target, 0, type(error).__name__) from None
        if not accepted(sink, status):
            raise NotifyFailed(target, status, f"HTTP {status}")


def _describe(reload: Reload, **more: object) -> dict[str, object]:
    return {"workload": f"{reload.kind}/{reload.name}", "namespace": reload.namespace, **more}
