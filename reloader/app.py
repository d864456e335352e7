"""Wiring and lifecycle: the only place that constructs things.

Read top-down, as the process runs::

    main → settings (exit 2 if invalid) → logging → connect → digest key
         → informers → index → queue → restarter → HTTP port
         → run: informers list+watch; once all are synced, workers start
         → SIGTERM/SIGINT set a stop event
         → shutdown: queue drains (in-flight patches finish), informers stop, port closes.

Workers start only after every informer has completed its initial list: deciding with half a cache
would see configs as missing. Any task that dies with an exception takes the process down (the
TaskGroup cancels its siblings), so Kubernetes restarts a broken controller instead of leaving a
zombie that answers probes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from reloader import access, logs, metainfo
from reloader.csi import PodStatuses
from reloader.digests import DigestKey
from reloader.events import EventRecorder
from reloader.http import build_app, serve
from reloader.index import ReferenceIndex
from reloader.kube import Api, ApiConflict, ApiError, ApiForbidden, ApiNotFound, connect
from reloader.leader import LeaderElector, LeaseTimings
from reloader.metrics import Metrics, Sources
from reloader.model import (
    CONFIG_KINDS,
    CONFIG_RESOURCES,
    KINDS,
    NAMESPACES,
    SECRETS,
    SPC,
    ConfigKey,
    ConfigKind,
    RawObject,
    WorkloadKey,
    WorkloadKind,
)
from reloader.notify import AlertConfig, Notifier, sink_of
from reloader.queue import TokenBucket, WorkQueue, shrink_to_fit
from reloader.restart import Restarter, RestartPolicy, run_worker, syncs_per_worker
from reloader.settings import Settings, load_settings_or_exit
from reloader.snapshots import (
    ConfigSnapshot,
    SnapshotContext,
    WorkloadSnapshot,
    config_snapshot,
    pack_config,
    refreshed_workload,
    unpacker,
    workload_snapshot,
)
from reloader.watch import CONFIG_PAGE_SIZE, WORKLOAD_PAGE_SIZE, Backoff, Informer, Packing

log = logging.getLogger("reloader")
T = TypeVar("T")
HASH_KEY_FIELD = "key"


class StartupError(Exception):
    """The controller cannot start as configured; the message says what to change. ``main``
    logs it and exits with code 2, as for invalid settings."""


async def load_digest_key(
    api: Api,
    settings: Settings,
    *,
    keep_trying: bool = False,
    waiting: Callable[[str], None] | None = None,
) -> DigestKey:
    """The digest key: from the setting or the key file, else from (or into) a Secret in our own
    namespace.

    Creating it when missing means a fresh install needs no manual step; a second replica racing to
    create it gets 409 and reads the winner's key, so all replicas agree. What waiting cannot fix
    (the namespace does not exist, RBAC refuses: Stakater's chart grants no ``create`` on Secrets)
    raises ``StartupError`` saying what to do, unless ``keep_trying``: in a pod an exit would only
    crash-loop, so the same message is logged as an error and retried, and the fix (a grant, the
    Secret created, the namespace) takes effect without a restart. The namespace is never created
    here, since which namespace the controller lives in is the installer's choice. Anything else
    (the server unreachable, a Secret without a usable key, which editing it fixes) is retried with
    backoff. ``waiting`` is told each reason for waiting (``/readyz`` shows it).
    """
    if settings.hash_key is not None:
        return DigestKey.from_secret(settings.hash_key.get_secret_value().encode())
    if settings.hash_key_file is not None:
        return key_from_file(settings.hash_key_file)
    namespace, name = settings.controller_namespace, settings.hash_key_secret
    path = SECRETS.object_path(namespace, name)
    backoff = Backoff()
    while True:
        try:
            return await _read_or_create_key(api, path, namespace, name)
        except StartupError as error:
            if not keep_trying:
                raise
            reason, level = str(error), logging.ERROR
        except ApiError as error:
            reason, level = f"cannot read the digest key secret: {error}", logging.WARNING
        delay = backoff.next_delay()
        log.log(
            level,
            "cannot read the digest key secret; retrying",
            extra={"namespace": namespace, "secret": name, "error": reason, "retry_in": delay},
        )
        if waiting is not None:
            waiting(f"waiting for the digest key: {reason}")
        await asyncio.sleep(delay)


async def wait_for_access(
    api: Api,
    settings: Settings,
    *,
    keep_trying: bool = False,
    waiting: Callable[[str], None] | None = None,
) -> bool:
    """True once the server allows everything ``settings`` need (``access.py``).

    A refusal is one line naming every missing grant: ``StartupError``, or with ``keep_trying``
    (in a pod) an error logged and retried until someone grants it; no watch starts before, since
    an informer allowed to list but not to watch would act on a cache that never changes.
    """
    backoff = Backoff()
    while True:
        try:
            missing = await access.refused(api, access.required(settings))
        except ApiError as error:
            reason = f"cannot check the controller's permissions: {error}"
        else:
            if not missing:
                return True
            reason = (
                f"the controller's account lacks {', '.join(missing)}: grant them (Stakater's "
                "chart grants fewer verbs; see "
                "docs/install.md#upgrading-from-stakaters-helm-chart)"
            )
            if not keep_trying:
                raise StartupError(reason)
        delay = backoff.next_delay()
        log.error("missing permissions; retrying", extra={"error": reason, "retry_in": delay})
        if waiting is not None:
            waiting(f"waiting for permissions: {reason}")
        await asyncio.sleep(delay)


def key_from_file(path: str) -> DigestKey:
    """The file's bytes as they are: a mounted Secret key gives exactly the Secret's bytes, so
    the same key whether mounted or read from the API."""
    try:
        with open(path, "rb") as file:
            return DigestKey.from_secret(file.read())
    except (OSError, ValueError) as error:
        message = f"cannot use the digest key file {path!r} (--hash-key-file): {error}"
        raise StartupError(message) from error


_OTHERWISE = (
    "or give the key with RELOADER_HASH_KEY or --hash-key-file "
    "(docs/configuration.md#the-digest-key)"
)


async def _read_or_create_key(api: Api, path: str, namespace: str, name: str) -> DigestKey:
    try:
        secret = await api.get(path)
    except ApiNotFound:
        await _create_key(api, namespace, name)
        secret = await api.get(path)
    except ApiForbidden as error:
        raise StartupError(
            f"forbidden to get Secret {name!r} in namespace {namespace!r} (the digest key): grant "
            f"'get' on secrets named {name!r} there to the controller's account, {_OTHERWISE}. "
            f"The server said: {error.message}"
        ) from error
    return key_from_secret(secret, namespace, name)


def key_from_secret(secret: RawObject, namespace: str, name: str) -> DigestKey:
    """The key in the Secret's ``key`` field; ``InvalidKeySecret`` when it has no usable one."""
    encoded_key = (secret.get("data") or {}).get(HASH_KEY_FIELD)
    if not encoded_key:
        raise ApiError(
            0, "InvalidKeySecret", f"secret {namespace}/{name} has no '{HASH_KEY_FIELD}'"
        )
    try:
        return DigestKey.from_secret(base64.b64decode(encoded_key))
    except ValueError as error:  # too short, or not base64: fixable by editing the Secret
        message = f"secret {namespace}/{name} key '{HASH_KEY_FIELD}': {error}"
        raise ApiError(0, "InvalidKeySecret", message) from error


async def _create_key(api: Api, namespace: str, name: str) -> None:
    """Create the key Secret with 32 random bytes; losing a race to another replica is fine."""
    encoded = base64.b64encode(DigestKey.generate_secret()).decode()
    body = {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "reloader"},
        },
        "type": "Opaque",
        "data": {HASH_KEY_FIELD: encoded},
    }
    try:
        await api.create(SECRETS.collection_path(namespace), body)
    except ApiConflict:
        return
    except ApiNotFound as error:
        raise StartupError(
            f"namespace {namespace!r} does not exist, so the digest key Secret {name!r} cannot be "
            f"created in it: create the namespace, or point --controller-namespace "
            f"(RELOADER_CONTROLLER_NAMESPACE, or POD_NAMESPACE) at the namespace the controller "
            f"runs in, {_OTHERWISE}"
        ) from error
    except ApiForbidden as error:
        raise StartupError(
            f"forbidden to create Secret {name!r} in namespace {namespace!r} (the digest key): "
            f"grant 'create' on secrets there to the controller's account, or create the Secret "
            f"yourself, {_OTHERWISE}. The server said: {error.message}"
        ) from error
    log.info("created the digest key secret", extra={"namespace": namespace, "secret": name})


class Controller:
    """Informers → index → queue → workers, for one API connection."""

    def __init__(
        self,
        *,
        settings: Settings,
        api: Api,
        digest_key: DigestKey,
        metrics: Metrics | None = None,
        leader: LeaderElector | None = None,
    ) -> None:
        self.settings = settings
        self.api = api
        self.leader = leader
        """With ``--enable-ha``: workers run, and writes go out, only while this holds the Lease."""
        self.digest_key = digest_key
        self.metrics = metrics or Metrics(by_namespace=settings.metrics_count_by_namespace)
        self.index = ReferenceIndex()
        self.queue: WorkQueue[WorkloadKey] = WorkQueue(
            on_dequeue=self.metrics.queue_latency.observe
        )
        self._changed_since: dict[WorkloadKey, float] = {}
        self._running = self._working = False
        self._watches: dict[str, asyncio.Task[None]] = {}
        context = SnapshotContext(
            digest_key=digest_key,
            names=settings.annotation_names(),
            auto_reload_all=settings.auto_reload_all,
            csi=settings.enable_csi_integration,
        )
        self.configs = {
            kind: self._config_informer(kind, context)
            for kind in CONFIG_KINDS
            if settings.watches_config(kind)
        }
        self.workloads = {
            name: self._workload_informer(kind, context)
            for name, kind in KINDS.items()
            if settings.watches_workload(kind)
        }
        self.namespaces = self._namespace_informer()
        self.csi = self._pod_statuses(digest_key) if settings.enable_csi_integration else None
        self.notifier = build_notifier(settings, self.metrics)
        self.restarter = Restarter(
            api=api,
            workloads=self.workloads,
            configs=self._config_sources(),
            digest_key=digest_key,
            policy=RestartPolicy(
                reload_on_create=settings.reload_on_create,
                reload_on_delete=settings.reload_on_delete,
                min_interval=settings.min_restart_interval_seconds,
                strategy=settings.reload_strategy,
                paused_at_annotation=settings.pause_deployment_time_annotation,
            ),
            restart_budget=TokenBucket(
                rate=settings.restart_rate_per_second, burst=settings.restart_burst
            ),
            record_budget=TokenBucket(
                rate=settings.record_rate_per_second, burst=settings.record_burst
            ),
            pending_jobs_namespace=settings.controller_namespace,
            metrics=self.metrics,
            events=EventRecorder(api=api, metrics=self.metrics, may_write=self.may_write),
            changed_since=self._changed_since.get,
            in_scope=self._namespace_selected,
            notifier=self.notifier,
            may_write=self.may_write,
        )
        identity = leader.identity if leader is not None else settings.identity
        self.metrics.is_leader.labels(identity=identity).set_function(
            lambda: float(self.may_write())
        )
        self.metrics.attach(
            Sources(
                informers=lambda: [i.statistics() for i in self.informers],
                queue_depth=self._queue_depth,
                api=api.statistics,
            )
        )

    def _config_informer(
        self, kind: ConfigKind, context: SnapshotContext
    ) -> Informer[ConfigSnapshot]:
        informer = Informer[ConfigSnapshot](
            api=self.api,
            resource=CONFIG_RESOURCES[kind],
            transform=partial(config_snapshot, kind, context=context),
            namespaces=self.settings.namespaces or None,
            label_selector=self.settings.config_label_selector,
            namespace_filter=self._namespace_allowed,
            stall_timeout=self.settings.stall_timeout_seconds,
            packing=Packing(pack_config, unpacker(kind)),
            page_size=CONFIG_PAGE_SIZE,
        )
        informer.subscribe(self._on_config)
        return informer

    def _workload_informer(
        self, kind: WorkloadKind, context: SnapshotContext
    ) -> Informer[WorkloadSnapshot]:
        informer = Informer[WorkloadSnapshot](
            api=self.api,
            resource=kind.resource,
            transform=partial(workload_snapshot, kind, context=context),
            namespaces=self.settings.namespaces or None,
            namespace_filter=self._namespace_allowed,
            stall_timeout=self.settings.stall_timeout_seconds,
            optional=kind.optional,
            page_size=WORKLOAD_PAGE_SIZE,
            refresh=refreshed_workload,
        )
        informer.subscribe(self._on_workload)
        return informer

    def _namespace_informer(self) -> Informer[str] | None:
        """With ``--namespace-selector`` (cluster-wide only): the names of matching namespaces."""
        selector = self.settings.namespace_label_selector
        if selector is None or not self.settings.cluster_wide:
            return None
        informer = Informer[str](
            api=self.api,
            resource=NAMESPACES,
            transform=lambda obj: obj.get("metadata", {}).get("name", ""),
            label_selector=selector,
            stall_timeout=self.settings.stall_timeout_seconds,
        )
        informer.subscribe(self._on_namespace)
        return informer

    def _pod_statuses(self, digest_key: DigestKey) -> PodStatuses:
        """With ``--enable-csi-integration``: SecretProviderClassPodStatus → per-workload views
        of each SecretProviderClass (``csi.py``); the CRD may be installed later."""
        statuses = PodStatuses(
            api=self.api,
            digest_key=digest_key,
            changed=self._on_provider_class,
            namespaces=self.settings.namespaces or None,
            namespace_filter=self._namespace_allowed,
            stall_timeout=self.settings.stall_timeout_seconds,
        )
        plural = statuses.informer.resource.plural
        statuses.informer.subscribe(
            lambda old, new: self.metrics.count_event(old=old, new=new, resource_type=plural)
        )
        return statuses

    def _config_sources(self) -> Mapping[ConfigKind, Informer[ConfigSnapshot]]:
        """What the restarter reads configs from: the informers, and the CSI views, which offer
        the one method it uses (``in_namespace``), per workload (``model.workload_config_name``)."""
        if self.csi is None:
            return self.configs
        return {**self.configs, SPC: cast(Informer[ConfigSnapshot], self.csi)}

    @property
    def informers(self) -> list[Informer[Any]]:
        extra: list[Informer[Any]] = [self.namespaces] if self.namespaces is not None else []
        extra += [self.csi.informer] if self.csi is not None else []
        return [*self.configs.values(), *self.workloads.values(), *extra]

    def _namespace_allowed(self, namespace: str) -> bool:
        """Static scope, applied before caching: ignored namespaces cost no memory."""
        return namespace not in self.settings.namespaces_to_ignore

    def _namespace_selected(self, namespace: str) -> bool:
        """Dynamic scope (namespace labels), applied when acting, so a label change needs no
        relist: the cache already holds the namespace's objects."""
        return self.namespaces is None or self.namespaces.get("", namespace) is not None

    def _queue_depth(self) -> tuple[int, int, int]:
        stats = self.queue.statistics()
        return stats.depth, stats.waiting, stats.processing

    # --- event handlers: update the index, enqueue what it returns; never act -------------------

    def _on_config(self, old: ConfigSnapshot | None, new: ConfigSnapshot | None) -> None:
        current = new or old
        if current is not None:
            resource = CONFIG_RESOURCES[current.kind].plural
            self.metrics.count_event(old=old, new=new, resource_type=resource)
        self._enqueue(self.index.config_changed(old, new))

    def settle_caches(self) -> None:
        """Once every informer has synced: the packed tables in buffers of their exact size, the
        start-up lists' memory handed back, and the cache out of the cyclic collector's reach."""
        for informer in self.configs.values():
            informer.compact()
        self.index.compact()
        self.shrink_work_tables()
        release_freed_memory()
        keep_out_of_collections()

    def shrink_work_tables(self) -> None:
        """The queue's tables and the change times sized for what they hold now: at the sync
        they hold the whole first pass (every opted-in workload), once it is done next to
        nothing, and a set or dict keeps the table of its fullest moment (about 200 KiB at
        2,000 workloads)."""
        self.queue.compact()
        shrink_to_fit(self._changed_since)

    def _on_provider_class(self, workload: WorkloadKey, config: ConfigKey) -> None:
        """One workload's view of a SecretProviderClass changed: look at it (after the debounce,
        as for a config) if it depends on that class."""
        if workload in self.index.dependents(config):
            self._enqueue(frozenset({workload}))

    def _on_workload(self, old: WorkloadSnapshot | None, new: WorkloadSnapshot | None) -> None:
        # A workload change (often our own write coming back) needs no debounce, but must not cut
        # short a debounce already running for a config burst: a waiting key is looked at anyway.
        for key in self.index.workload_changed(old, new):
            if self.queue.ready_at(key) is None:
                self.queue.add(key)

    def _on_namespace(self, old: str | None, new: str | None) -> None:
        """A namespace entered or left the selection: look again at its opted-in workloads."""
        self.metrics.count_event(old=old, new=new, resource_type=NAMESPACES.plural)
        namespace = new or old or ""
        keys = {
            workload.key
            for informer in self.workloads.values()
            for workload in informer.in_namespace(namespace).values()
            if workload.policy.opted_in
        }
        self._enqueue(frozenset(keys))

    def _enqueue(self, keys: frozenset[WorkloadKey]) -> None:
        now = time.monotonic()
        for key in keys:
            self._changed_since.setdefault(key, now)
            self.queue.add(key, delay=self.settings.debounce_seconds)

    def _settled(self, key: WorkloadKey) -> None:
        self._changed_since.pop(key, None)

    # --- probes --------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        waiting = [i.resource.plural for i in self.informers if not i.synced]
        if self.csi is not None and self.csi.informer.synced and not self.csi.synced:
            waiting.append("the workloads of secretproviderclasspodstatuses")
        return (not waiting, "ok" if not waiting else "waiting for " + ", ".join(waiting))

    def healthy(self) -> tuple[bool, str]:
        """Alive while every watch loop runs (a loop that died takes the process down anyway;
        this also covers the window before that and after a stop)."""
        if not self._running:
            return False, "not running"
        dead = [name for name, task in self._watches.items() if task.done()]
        return (not dead, "ok" if not dead else "watch loop ended: " + ", ".join(dead))

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                self._watches = {
                    i.resource.plural: group.create_task(i.run()) for i in self.informers
                }
                if self.csi is not None:
                    self._watches["csi-owners"] = group.create_task(self.csi.resolve())
                watches = list(self._watches.values())
                events = self.restarter.events
                writer = group.create_task(events.run())
                workers = group.create_task(self._work_when_synced(stop))
                leader = self.leader
                electing = group.create_task(leader.run()) if leader is not None else None
                notifier = self.notifier
                senders = group.create_task(notifier.run()) if notifier is not None else None
                await stop.wait()
                log.info("stopping: finishing in-flight work")
                # Drain only once workers run; before that nobody would take the queued keys, and
                # the task still waiting for the caches is simply cancelled.
                await self.queue.shutdown(drain=self._working)
                if not self._working:
                    workers.cancel()
                await asyncio.gather(workers, return_exceptions=True)
                await self._step_down(electing)
                await events.close(writer)  # the last restarts' Events, for a few seconds at most
                if notifier is not None and senders is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.notify_timeout_seconds):
                            await notifier.wait_flushed()  # queued alerts get one timeout
                    senders.cancel()
                for task in watches:
                    task.cancel()
        finally:
            self._running = False
            gc.unfreeze()  # what this run froze is collectable again once it is over

    async def wait_synced(self) -> None:
        for informer in self.informers:
            await informer.wait_synced()
        if self.csi is not None:
            await self.csi.wait_synced()

    async def _work_when_synced(self, stop: asyncio.Event) -> None:
        await self.wait_synced()
        self.settle_caches()
        if self.leader is None:
            await self._work()
            return
        log.info("caches synced; standing by for the lease", extra={"lease": self.leader.name})
        while await self._work_while_leading(self.leader):
            if stop.is_set():  # lost during the shutdown's drain: nobody is left to drain it
                await self.queue.shutdown(drain=False)
                return

    async def _work_while_leading(self, leader: LeaderElector) -> bool:
        """One term: from winning the Lease to losing it (True) or to the queue's shutdown
        (False). The caches stayed synced meanwhile, so the new leader acts at once; it looks at
        every opted-in workload, since the old leader may have died with work undone (the records
        say what was done, so nothing restarts twice)."""
        await leader.wait_leading()
        self._enqueue_opted_in()
        async with asyncio.TaskGroup() as group:
            work = group.create_task(self._work())
            lost = group.create_task(leader.wait_lost())
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            ended = work.done()
            work.cancel()  # the term is over: in-flight writes stop here
            lost.cancel()
        return not ended

    def _enqueue_opted_in(self) -> None:
        """Every opted-in workload, without cutting short a debounce already running (as for
        workload events): a config burst still gives one rollout."""
        for informer in self.workloads.values():
            for workload in informer.values():
                if workload.policy.opted_in and self.queue.ready_at(workload.key) is None:
                    self.queue.add(workload.key)

    async def _work(self) -> None:
        await self._resume_pending_jobs()
        self._working = True
        log.info("starting workers", extra={"workers": self.settings.workers})
        trimming = asyncio.create_task(self._release_after_first_pass())
        parallel = syncs_per_worker(
            workers=self.settings.workers, restart_burst=self.settings.restart_burst
        )
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.settings.workers):
                    group.create_task(
                        run_worker(
                            queue=self.queue,
                            restarter=self.restarter,
                            metrics=self.metrics,
                            settled=self._settled,
                            parallel=parallel,
                        )
                    )
        finally:
            trimming.cancel()
            self._working = False

    async def _release_after_first_pass(self) -> None:
        """Trim again once the first look at every opted-in workload is done: at scale that pass
        (a decision, and at first sight a record, per workload) is the second start-up burst of
        short-lived objects; the trim after the sync could not return it.

        Off the event loop, and without a full collection: this can fall while restarts are
        being made (workloads created just after start), and a full collection of a large cache
        held the loop for 40 ms, which showed as the p99 of a burst of changes."""
        while True:
            await asyncio.sleep(FIRST_PASS_POLL_SECONDS)
            if not any(self._queue_depth()):  # nothing ready, deferred or being synced
                self.shrink_work_tables()
                await asyncio.to_thread(trim_allocator)
                return

    def may_write(self) -> bool:
        """Whether this replica may write now: always without ``--enable-ha``; with it, only
        within the term of the last Lease renewal (a clock check, so it is never late)."""
        return self.leader is None or self.leader.leading

    async def _step_down(self, electing: asyncio.Task[None] | None) -> None:
        """After the workers have stopped: stop renewing and give the Lease up, so a standby
        takes over at its next poll rather than a lease duration later."""
        if self.leader is None or electing is None:
            return
        electing.cancel()
        await asyncio.gather(electing, return_exceptions=True)
        await self.leader.release()

    async def _resume_pending_jobs(self) -> None:
        """Queue the Jobs a previous run deleted and did not create again, before any other work.

        Retried while the server is unreachable (the workers could do nothing then anyway); a 403
        (RBAC without ``list`` on configmaps in the controller's namespace) is logged and skipped,
        since it must not keep every other workload waiting.
        """
        backoff = Backoff()
        while True:
            try:
                keys = await self.restarter.resume_pending_jobs()
                break
            except ApiError as error:
                namespace = self.settings.controller_namespace
                if isinstance(error, ApiForbidden) or not error.retryable:
                    log.error(
                        "cannot list pending job copies; they wait for a later start",
                        extra={"namespace": namespace, "error": str(error)},
                    )
                    return
                delay = backoff.next_delay()
                log.warning(
                    "cannot list pending job copies; retrying",
                    extra={"namespace": namespace, "error": str(error), "retry_in": delay},
                )
                await asyncio.sleep(delay)
        for key in keys:
            log.info("re-creating a job a previous run deleted", extra={"job": str(key)})
            self.queue.add(key)


def build_notifier(settings: Settings, metrics: Metrics) -> Notifier | None:
    """Webhook mode and alerts as configured; None when neither is on.

    Alerts on without a URL are a warning, not an exit: Stakater starts that way (and sends
    nothing), and a drop-in replacement must not crash-loop on it. Nothing here logs a URL.
    """
    alerts = None
    if settings.alert_on_reload and settings.alert_webhook_url is None:
        log.warning("ALERT_ON_RELOAD is true but ALERT_WEBHOOK_URL is not set: no alerts are sent")
    elif settings.alert_on_reload and settings.alert_webhook_url is not None:
        proxy = settings.alert_webhook_proxy
        alerts = AlertConfig(
            url=settings.alert_webhook_url.get_secret_value(),
            sink=sink_of(settings.alert_sink),
            proxy=proxy.get_secret_value() if proxy is not None else None,
            additional_info=settings.alert_additional_info,
        )
        log.info("alerts on reload", extra={"sink": alerts.sink})
    webhook = settings.webhook_url.get_secret_value() if settings.webhook_url else None
    if webhook is not None:
        log.info("webhook mode: reloads are sent to the webhook instead of restarting workloads")
    if webhook is None and alerts is None:
        return None
    return Notifier(
        webhook_url=webhook,
        alerts=alerts,
        timeout=settings.notify_timeout_seconds,
        webhook_slots=max(1, settings.workers - 1),
        count=lambda target, result: metrics.notifications.labels(target, result).inc(),
    )


def build_leader(api: Api, settings: Settings) -> LeaderElector | None:
    """With ``--enable-ha``, this replica's candidacy for the Lease in the controller namespace."""
    if not settings.enable_ha:
        return None
    timings = LeaseTimings(
        lease_duration=settings.lease_duration_seconds,
        renew_deadline=settings.renew_deadline_seconds,
        retry_period=settings.retry_period_seconds,
    )
    return LeaderElector(
        api=api,
        namespace=settings.controller_namespace,
        name=settings.lease_name,
        identity=settings.identity,
        timings=timings,
    )


FIRST_PASS_POLL_SECONDS = 1.0


def release_freed_memory() -> None:
    """Hand the memory of the initial lists back to the system.

    Decoding every ConfigMap and Secret once leaves tens of MiB that the allocator keeps after the
    raw objects are dropped (only their small snapshots stay); without this the process's RSS stays
    at its start-up peak. glibc only; elsewhere a no-op.
    """
    gc.collect()
    trim_allocator()


def keep_out_of_collections() -> None:
    """Move everything alive after the first sync out of the cyclic collector's reach.

    The cache is hundreds of thousands of snapshot objects that are never part of a cycle (they are
    freed by reference counting when replaced). Left in the oldest generation, every full
    collection walked all of them: 20-40 ms with the event loop held, and a burst of restarts
    makes enough new objects to start one. Frozen, a full collection walks only what was made
    since. The cost:
    an object alive now that later becomes part of a garbage cycle is never collected, so at most
    what exists at this point can leak, once; nothing made later is frozen."""
    gc.freeze()


def trim_allocator() -> None:
    """glibc's ``malloc_trim``: free pages of the heap go back to the system. ctypes releases
    the GIL for the call, so it can run in a thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def in_a_pod() -> bool:
    """The kubelet sets ``KUBERNETES_SERVICE_HOST`` in every container. Run by hand, a setting
    that cannot work ends the process (exit 2); in a pod that would only crash-loop it, so the
    start waits and retries instead, alive, not ready, and saying why."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class StartupProbes:
    """``/healthz`` and ``/readyz`` from the first moment the port is open.

    Before the controller exists (waiting for the digest key) the process is alive, since a
    restart would fix nothing, and not ready, with the reason; then the controller answers.
    """

    def __init__(self) -> None:
        self.controller: Controller | None = None
        self.reason = "starting"

    def waiting(self, reason: str) -> None:
        self.reason = reason

    def healthy(self) -> tuple[bool, str]:
        return self.controller.healthy() if self.controller else (True, self.reason)

    def ready(self) -> tuple[bool, str]:
        return self.controller.ready() if self.controller else (False, self.reason)


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None if ``stop`` is set first (SIGTERM while the API is down)."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopped):
        if not pending.done():
            pending.cancel()
    await asyncio.gather(task, stopped, return_exceptions=True)
    return task.result() if not task.cancelled() else None


async def run(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    api = await connect(kubeconfig=settings.kubeconfig)
    metrics = Metrics(by_namespace=settings.metrics_count_by_namespace)
    probes = StartupProbes()
    app = build_app(registry=metrics.registry, healthy=probes.healthy, ready=probes.ready)
    runner = await serve(app, host=settings.metrics_address, port=settings.metrics_port)
    try:
        await metainfo.publish(api, settings)
        loading = load_digest_key(api, settings, keep_trying=in_a_pod(), waiting=probes.waiting)
        digest_key = await _unless_stopped(loading, stop)
        if digest_key is None:
            return
        checking = wait_for_access(api, settings, keep_trying=in_a_pod(), waiting=probes.waiting)
        if not await _unless_stopped(checking, stop):
            return
        controller = Controller(
            settings=settings,
            api=api,
            digest_key=digest_key,
            metrics=metrics,
            leader=build_leader(api, settings),
        )
        probes.controller = controller
        log.info(
            "reloader started",
            extra={
                "server": api.server,
                "port": settings.metrics_port,
                "namespaces": ",".join(settings.namespaces) or "*",
                "digest_key_id": digest_key.key_id,
            },
        )
        await controller.run(stop)
    finally:
        await runner.cleanup()
        await api.close()
    log.info("reloader stopped")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["explain"]:
        # Imported here: explain builds on this module (the key Secret's field), not the reverse.
        from reloader.explain import main as explain

        raise SystemExit(explain(args[1:]))
    settings = load_settings_or_exit(args)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    if settings.namespace_selector and not settings.cluster_wide:
        log.warning("--namespace-selector applies only when watching all namespaces; ignored")
    for flag in settings.ignored_compatibility_flags():
        log.warning(
            "flag accepted for compatibility but not supported; ignored", extra={"flag": flag}
        )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(settings))
    except StartupError as error:
        log.error("cannot start", extra={"reason": str(error)})
        raise SystemExit(2) from None
