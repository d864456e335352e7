"""Workers: a workload key → current state → decision → at most one restart, plus an Event.

``Restarter.sync`` is the analogue of sample-controller's ``syncHandler``: it reads the *current*
snapshots (never the event that caused the key to be queued), decides, and writes. It returns how
long to wait before looking again (a restart held back by the per-workload minimum interval, the
global restart rate, or a pause period) or raises; ``run_worker`` turns that into queue operations,
so the retry policy lives in one place.

The request bodies come from ``patches.py``; this module only chooses and sends them:

- Deployment, StatefulSet, DaemonSet: one strategic-merge patch that restarts and records together
  (merge patch for Argo Rollouts, which are custom resources), so a restart is never done without
  being recorded and a crash cannot cause a duplicate;
- CronJob: create a Job from its jobTemplate (idempotent name), then record;
- Job: delete that very Job (uid + resourceVersion preconditions) and create it again;
- record only: the metadata annotation, which never rolls pods.

Every write is made against the ``resourceVersion`` the decision was made on. If the workload
changed since (or our own previous patch has not reached the cache yet) the server answers 409 and
the key is retried against fresh state, so a stale cache can never cause a second restart.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

from reloader.annotations import DEFAULT_NAMES
from reloader.decide import Decision, Dependency, decide, dependencies
from reloader.digests import DigestKey, encode_record
from reloader.events import EventRecorder, Subject
from reloader.kube import (
    Api,
    ApiConflict,
    ApiError,
    ApiForbidden,
    ApiInvalid,
    ApiNotFound,
    ApiUnavailable,
    PatchType,
)
from reloader.metrics import Metrics
from reloader.model import (
    CONFIGMAPS,
    JOBS,
    KINDS,
    RECORD_ANNOTATION,
    ConfigKind,
    RawObject,
    WorkloadKey,
    WorkloadKindName,
)
from reloader.notify import Notifier, NotifyFailed, Reload, delivery_id
from reloader.patches import (
    PENDING_JOB_LABEL,
    RECREATED_FROM_ANNOTATION,
    Strategy,
    env_containers,
    job_from_cronjob,
    pending_job,
    pending_job_configmap,
    pending_job_name,
    record_patch,
    recreated_job,
    restart_at_patch,
    restart_patch,
    template_change,
    unpause_patch,
)
from reloader.queue import QueueShutDown, TokenBucket, Turns, WorkQueue
from reloader.snapshots import ConfigSnapshot, WorkloadSnapshot
from reloader.watch import Informer

log = logging.getLogger("reloader.restart")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    reload_on_create: bool
    reload_on_delete: bool
    min_interval: float
    strategy: Strategy = "annotations"
    paused_at_annotation: str = DEFAULT_NAMES.paused_at


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a sync did; ``requeue_after`` > 0 means look again then (not an error)."""

    action: str
    requeue_after: float = 0.0


RECORD_RATE = 50.0
RECORD_BURST = 100
"""The record-write budget (first sight, re-record), separate from the restart budget: records do
not roll pods, so they need not wait behind restarts (nor restarts behind the records of a first
start), but 10,000 workloads seen at start-up must not be 10,000 patches at once. At 50 per second
they are recorded in under four minutes."""

CONFLICTS_BEFORE_WARNING = 5
"""409s in a row on one workload that are expected (a cache one write behind) and logged at debug;
more than that is worth a warning."""

JOB_RECREATE_TIMEOUT = 30.0
"""How long to keep trying to create a Job again while the deleted one is still going away."""
WEBHOOK_BUSY_RETRY = 1.0
"""Seconds before a reload comes back when every webhook slot is taken (webhook mode)."""
JobState = Literal["ours", "old", "deleting", "other", "absent", "unknown"]
"""The Job under a name being re-created, seen from the copy: ``_create_job`` acts on each."""


class Restarter:
    """Turns a workload key into at most one restart (and the writes that record it)."""

    def __init__(
        self,
        *,
        api: Api,
        workloads: Mapping[WorkloadKindName, Informer[WorkloadSnapshot]],
        configs: Mapping[ConfigKind, Informer[ConfigSnapshot]],
        digest_key: DigestKey,
        policy: RestartPolicy,
        restart_budget: TokenBucket,
        metrics: Metrics,
        record_budget: TokenBucket | None = None,
        events: EventRecorder | None = None,
        pending_jobs_namespace: str = "reloader",
        changed_since: Callable[[WorkloadKey], float | None],
        in_scope: Callable[[str], bool] = lambda namespace: True,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self._api = api
        self._may_write = may_write
        """False while another replica leads (``--enable-ha``): checked before deciding and
        before every patch, so a replica that lost the Lease writes nothing more."""
        self._notifier = notifier
        self._workloads = workloads
        self._configs = configs
        self._key = digest_key
        self._policy = policy
        self._restart_turns: Turns[WorkloadKey] = Turns(restart_budget)
        self.record_budget = record_budget or TokenBucket(rate=RECORD_RATE, burst=RECORD_BURST)
        self._record_turns: Turns[WorkloadKey] = Turns(self.record_budget)
        self.pending_jobs_namespace = pending_jobs_namespace
        """Where copies of Jobs being re-created are kept: the controller's own namespace."""
        self._metrics = metrics
        self.events = events or EventRecorder(api=api, metrics=metrics)
        """Where Events go: written in the background, never in a worker's path."""
        self._changed_since = changed_since
        self._in_scope = in_scope
        self._clock = clock
        self._reported: dict[WorkloadKey, tuple[object, ...]] = {}
        self._deferrals: dict[WorkloadKey, tuple[str, ...]] = {}
        """The triggers of each restart held back and already reported (``_report_deferral``):
        until it happens, or is no longer needed, more deferrals of it write nothing."""
        self._unborn_jobs: dict[WorkloadKey, dict[str, Any]] = {}
        """Jobs deleted for a restart whose re-creation has not succeeded yet: kept here because
        the cache no longer has them, so a retry would otherwise find nothing and drop them."""
        for informer in workloads.values():
            informer.subscribe(self._on_workload)

    def _on_workload(self, old: WorkloadSnapshot | None, new: WorkloadSnapshot | None) -> None:
        """A workload that left the cache takes its bookkeeping along: it may never be synced
        again (the index does not queue deleted workloads), so ``sync`` cannot be relied on."""
        if new is None and old is not None:
            self._forget(old.key)

    def _forget(self, key: WorkloadKey) -> None:
        self._reported.pop(key, None)
        self._deferrals.pop(key, None)
        self._release(key)

    def _release(self, key: WorkloadKey) -> None:
        """Give back any turn ``key`` reserved and will not use now."""
        self._restart_turns.release(key)
        self._record_turns.release(key)

    def tracked(self) -> int:
        """Workloads this restarter holds state for (reported problems, reserved turns): bounded
        by the cache, since a workload that leaves it is forgotten."""
        return len({*self._reported, *self._deferrals, *self._restart_turns, *self._record_turns})

    def current(self, key: WorkloadKey) -> WorkloadSnapshot | None:
        informer = self._workloads.get(key.kind)
        return informer.get(key.namespace, key.name) if informer is not None else None

    async def sync(self, key: WorkloadKey) -> Outcome:
        self._check_may_write(key)
        if key in self._unborn_jobs:
            await self._create_job(key, self._unborn_jobs[key])
            return Outcome("restart")
        workload = self.current(key)
        if workload is None:
            self._forget(key)
            return Outcome("gone")
        if not self._in_scope(key.namespace):
            self._release(key)
            return Outcome("out of scope")
        self._report_problems(workload)
        configs = {kind: i.in_namespace(key.namespace) for kind, i in self._configs.items()}
        deps = dependencies(workload, configs, key=self._key)
        decision = decide(
            recorded=workload.recorded,
            deps=deps,
            key_id=self._key.key_id,
            reload_on_create=self._policy.reload_on_create,
            reload_on_delete=self._policy.reload_on_delete,
        )
        if decision.action == "nothing":
            self._release(key)  # it may have reserved a turn while it still needed a write
            self._deferrals.pop(key, None)
            return await self._pause_check(workload)
        if decision.action == "restart":
            wait = self._restart_wait(workload)
            if wait > 0:
                self._metrics.restarts_deferred.inc()
                self._report_deferral(workload, decision)
                return Outcome("deferred", requeue_after=wait)
            if self._webhook_busy():
                self._restart_turns.keep(key)  # its turn came: kept for when a slot is free
                return Outcome("deferred", requeue_after=WEBHOOK_BUSY_RETRY)
        else:
            self._restart_turns.release(key)
            wait = self._record_turns.wait(key)
            if wait > 0:
                return Outcome("deferred", requeue_after=wait)
        return await self._write(workload, decision, deps)

    def _restart_wait(self, workload: WorkloadSnapshot) -> float:
        """Seconds to hold a restart back: per-workload interval first, then the workload's turn
        under the global rate (reserved once, so it is looked at again only when its turn comes)."""
        key, now = workload.key, self._clock()
        self._record_turns.release(key)
        if workload.last_restart_at is not None:
            remaining = workload.last_restart_at + self._policy.min_interval - now
            if remaining > 0:
                self._restart_turns.release(key)  # not before the interval: no turn held meanwhile
                return remaining
        return self._restart_turns.wait(key)

    def _webhook_busy(self) -> bool:
        """Webhook mode with every delivery slot taken by a slow endpoint: come back rather than
        hold a worker that records and resumes of other workloads need."""
        notifier = self._notifier
        return notifier is not None and notifier.webhook_mode and notifier.webhook_saturated()

    def _check_may_write(self, key: WorkloadKey, decision: Decision | None = None) -> None:
        """Raise a retryable failure when this replica is not the leader: the key stays queued
        and the new term (or the new leader, which looks at every workload) decides it."""
        if not self._may_write():
            error = ApiUnavailable(0, "NotLeader", "this replica does not hold the leader lease")
            raise RestartFailed(key, decision or Decision("nothing", None, (), "not leader"), error)

    # --- pause period (Deployments) -------------------------------------------------------------

    def _pause_remaining(self, workload: WorkloadSnapshot) -> float | None:
        """None if we did not pause it; else seconds until it should be resumed (<= 0: now)."""
        if workload.paused_at is None or not workload.paused:
            return None
        period = workload.policy.pause_period or 0.0
        # paused-at has whole seconds: one more second so the pause is never cut short.
        return workload.paused_at + 1.0 + period - self._clock()

    async def _pause_check(self, workload: WorkloadSnapshot) -> Outcome:
        """Resume a Deployment we paused once its period is over. The state lives on the object,
        so a controller restart in between changes nothing."""
        remaining = self._pause_remaining(workload)
        if remaining is None:
            return Outcome("nothing")
        if remaining > 0:
            return Outcome("paused", requeue_after=remaining)
        patch = unpause_patch(workload, paused_at_annotation=self._policy.paused_at_annotation)
        try:
            await self._patch(workload, patch, Decision("record", None, (), "pause period over"))
        except RestartFailed as failure:
            if isinstance(failure.error, ApiNotFound):
                return Outcome("gone")
            raise
        log.info("resumed deployment after its pause period", extra=_fields(workload.key))
        return Outcome("resumed")

    def _pauses(self, workload: WorkloadSnapshot) -> bool:
        return (
            workload.key.kind == "Deployment"
            and workload.policy.pause_period is not None
            and not workload.paused
        )

    # --- writes ---------------------------------------------------------------------------------

    async def _patch(
        self, workload: WorkloadSnapshot, patch: dict[str, Any], decision: Decision
    ) -> None:
        key = workload.key
        kind = KINDS[key.kind]
        path = kind.resource.object_path(key.namespace, key.name)
        patch_type: PatchType = "strategic" if kind.strategic_merge else "merge"
        self._check_may_write(key, decision)
        try:
            await self._api.patch(path, patch, patch_type=patch_type)
        except ApiError as error:
            raise RestartFailed(key, decision, error) from error

    async def _record_first_sight(self, workload: WorkloadSnapshot, decision: Decision) -> None:
        """Write the first record as a compare-and-swap on the record annotation itself, not on
        the whole object's resourceVersion.

        A new Deployment's status is updated by its controller right after creation, so a patch
        guarded by the resourceVersion we saw conflicts (409) for nearly every new workload: a
        retry each, 2,000 extra requests at start-up on 2,000 workloads. What the record decision
        depends on is that no record was there: the JSON patch tests exactly that, so a status
        update in between no longer matters, while a record written meanwhile (our own earlier
        write not in the cache yet, a restart, another leader's) still fails the write and the
        key is decided again, as before. A pod template or uid changed meanwhile is caught by the
        record's own binding (the template hash and uid it carries): it is set aside on sight.

        The server answers 422 both when the test fails and when the object has no annotations
        at all (the ``add`` needs the map): either way the guarded merge patch is sent instead,
        which writes the map or conflicts exactly as before.
        """
        key = workload.key
        assert decision.record is not None
        path = KINDS[key.kind].resource.object_path(key.namespace, key.name)
        pointer = "/metadata/annotations/" + RECORD_ANNOTATION.replace("~", "~0").replace("/", "~1")
        operations = [
            {"op": "test", "path": pointer, "value": None},
            {"op": "add", "path": pointer, "value": encode_record(decision.record)},
        ]
        self._check_may_write(key, decision)
        try:
            await self._api.patch(path, operations, patch_type="json")
        except ApiInvalid:
            await self._patch(workload, record_patch(workload, decision), decision)
        except ApiError as error:
            raise RestartFailed(key, decision, error) from error

    async def _write(
        self, workload: WorkloadSnapshot, decision: Decision, deps: Mapping[str, Dependency]
    ) -> Outcome:
        key = workload.key
        try:
            if decision.action == "record" and _no_record_found(workload):
                await self._record_first_sight(workload, decision)
            elif decision.action == "record":
                await self._patch(workload, record_patch(workload, decision), decision)
            if decision.action == "record":
                log.info("recorded config digests", extra=_fields(key, reason=decision.reason))
                self._metrics.records.inc()
                if decision.reset:
                    self._metrics.record_resets.labels(reason=decision.reset).inc()
                return Outcome(
                    "record", requeue_after=max(0.0, self._pause_remaining(workload) or 0)
                )
            if self._notifier is not None and self._notifier.webhook_mode:
                await self._deliver(workload, decision)
                return Outcome("webhook")
            await self._restart(workload, decision, deps)
        except RestartFailed as failure:
            if isinstance(failure.error, ApiNotFound):
                # Deleted since we read it; nothing left to restart. Counted apart from failures:
                # it is neither a restart nor a refusal.
                if decision.action == "restart":
                    self._metrics.action_total.labels(workload_kind=key.kind, result="gone").inc()
                return Outcome("gone")
            if isinstance(failure.error, ApiConflict):
                # Nothing was written: the retry on fresh state keeps this turn, not a second one.
                turns = self._restart_turns if decision.action == "restart" else self._record_turns
                turns.keep(key)
            if decision.action == "restart" and permanent_for_writes(failure.error):
                # Retryable errors (409, 429, 5xx) are counted as retries; only a restart that
                # cannot happen counts as a failed reload.
                self._metrics.count_reload(namespace=key.namespace, success=False)
            raise
        self._restarted(workload, decision)
        remaining = workload.policy.pause_period if self._pauses(workload) else None
        remaining = remaining if remaining is not None else self._pause_remaining(workload)
        return Outcome("restart", requeue_after=max(0.0, remaining or 0.0))

    async def _deliver(self, workload: WorkloadSnapshot, decision: Decision) -> None:
        """Webhook mode: POST the reload instead of restarting, then record its digests.

        At least once: the record is written only after the endpoint accepted the POST, so a
        failure in between (a 409 on the record, a crash) sends it again, with the same delivery
        id for the receiver to drop. Recording first would make a failed POST a lost reload.
        """
        assert self._notifier is not None
        try:
            await self._notifier.deliver(self._reload(workload, decision))
        except NotifyFailed as failure:
            error = ApiError(failure.status, "WebhookFailed", str(failure))
            raise RestartFailed(workload.key, decision, error) from None
        await self._patch(workload, record_patch(workload, decision), decision)
        configs = ", ".join(decision.triggers)
        log.info("reload sent to the webhook", extra=_fields(workload.key, configs=configs))

    def _reload(self, workload: WorkloadSnapshot, decision: Decision) -> Reload:
        key, record = workload.key, decision.record
        digests = record.configs if record is not None else ()
        ident = delivery_id(uid=workload.uid, workload=str(key), digests=digests)
        return Reload(key.kind, key.namespace, key.name, decision.triggers, ident)

    async def _restart(
        self, workload: WorkloadSnapshot, decision: Decision, deps: Mapping[str, Dependency]
    ) -> None:
        kind, now, strategy = KINDS[workload.key.kind], self._clock(), self._policy.strategy
        assert decision.record is not None
        decision = replace(decision, record=replace(decision.record, restarted_at=int(now)))
        change = template_change(workload, decision, deps, strategy=strategy, now=now)
        if kind.restart == "create-job":
            await self._run_cronjob(workload, decision, change)
        elif kind.restart == "recreate":
            await self._recreate_job(workload, decision, change)
        elif kind.restart == "rollout" and workload.policy.rollout_strategy == "restart":
            await self._patch(workload, restart_at_patch(workload, decision, now=now), decision)
        elif kind.restart == "rollout" and strategy == "env-vars":
            await self._rollout_env_vars(workload, decision, change)
        else:
            pause = self._policy.paused_at_annotation if self._pauses(workload) else None
            patch = restart_patch(workload, decision, change, now=now, pause_annotation=pause)
            await self._patch(workload, patch, decision)

    async def _get(self, workload: WorkloadSnapshot, decision: Decision) -> RawObject:
        """The full object, only for kinds whose restart needs more than the snapshot holds."""
        key = workload.key
        path = KINDS[key.kind].resource.object_path(key.namespace, key.name)
        try:
            obj = await self._api.get(path)
        except ApiError as error:
            raise RestartFailed(key, decision, error) from error
        if obj.get("metadata", {}).get("resourceVersion") != workload.resource_version:
            conflict = ApiConflict(409, "Conflict", "changed since the decision; deciding again")
            raise RestartFailed(key, decision, conflict)
        return obj

    # --- CronJob and Job restarts ---------------------------------------------------------------

    async def _run_cronjob(
        self, workload: WorkloadSnapshot, decision: Decision, change: Mapping[str, Any]
    ) -> None:
        """Create a Job from the CronJob now, then record. The Job's name comes from the record it
        replaces and the new one (``patches.cronjob_job_name``): a retry of this restart (a crash
        or a failed record patch after the create) gets 409 and counts as done, while the next
        restart gets a new name even if the config has come back to an earlier value."""
        cronjob = await self._get(workload, decision)
        job = job_from_cronjob(cronjob, change, record=decision)
        try:
            await self._api.create(JOBS.collection_path(workload.key.namespace), job)
        except ApiConflict:
            name = job["metadata"]["name"]
            log.info("job for this restart exists already", extra=_fields(workload.key, job=name))
        except ApiError as error:
            raise RestartFailed(workload.key, decision, error) from error
        await self._patch(workload, record_patch(workload, decision), decision)

    async def _recreate_job(
        self, workload: WorkloadSnapshot, decision: Decision, change: Mapping[str, Any]
    ) -> None:
        """Delete the Job (only the very instance decided on: uid and resourceVersion
        preconditions) and create it again with the new record. This reruns it.

        A copy of the new Job is stored first (``_keep_pending``), so a Job is never deleted
        without one: if the process dies before the create, the next start finishes it
        (``resume_pending_jobs``). A delete refused with an answer (4xx) deleted nothing, so the
        copy goes. A delete without an answer (timeout, connection error, 5xx) may have deleted
        the Job: the create goes ahead and ``_create_job`` finds out which it was.
        """
        key = workload.key
        job = await self._get(workload, decision)
        body = recreated_job(job, change, record=decision)
        await self._keep_pending(key, body, decision)
        path = JOBS.object_path(key.namespace, key.name)
        preconditions = {"uid": workload.uid, "resourceVersion": workload.resource_version}
        try:
            await self._api.delete(path, propagation="Background", preconditions=preconditions)
        except ApiError as error:
            if 0 < error.status < 500:
                await self._drop_pending(key, decision)
                raise RestartFailed(key, decision, error) from error
            log.warning(
                "job delete got no answer; it may be gone: creating it again",
                extra=_fields(key, error=str(error)),
            )
        await self._create_job(key, body)

    async def _create_job(self, key: WorkloadKey, body: dict[str, Any]) -> None:
        """Create the replacement Job, waiting out the old one's removal.

        The copy (``_unborn_jobs`` and its ConfigMap) stays until the Job exists, so any failure
        here, even a refusal for good, leaves it for the next retry or the next start. It goes
        without a create only when the old Job turns out not to be deleted (a delete that got no
        answer and did nothing: the key is decided again) or another Job has taken the name.
        """
        decision = Decision("restart", None, (), "re-creating the job")
        deadline = time.monotonic() + JOB_RECREATE_TIMEOUT
        while True:
            try:
                await self._api.create(JOBS.collection_path(key.namespace), body)
                break
            except ApiConflict as error:
                state = await self._job_is(key, body)
                if state == "ours":
                    break
                if state == "other":
                    log.warning("another job has taken the name", extra=_fields(key))
                if state in ("old", "other"):
                    await self._drop_pending(key, decision)
                    raise RestartFailed(key, decision, error) from error
                if time.monotonic() > deadline:
                    raise RestartFailed(key, decision, error) from error
                await asyncio.sleep(0.2)
            except ApiError as error:
                if not error.retryable:
                    log.error(
                        "job deleted and its replacement refused; kept for the next start",
                        extra=_fields(key, configmap=self._pending_path(key), error=str(error)),
                    )
                raise RestartFailed(key, decision, error) from error
        await self._drop_pending(key, decision)

    async def _job_is(self, key: WorkloadKey, body: Mapping[str, Any]) -> JobState:
        """What the Job under that name is now, compared with the one it replaces (``body``
        names its uid): ours, the old one (being deleted or not), another, absent, or unknown."""
        try:
            current = await self._api.get(JOBS.object_path(key.namespace, key.name))
        except ApiNotFound:
            return "absent"
        except ApiError:
            return "unknown"
        metadata: Mapping[str, Any] = current.get("metadata") or {}
        replaced = body["metadata"]["annotations"].get(RECREATED_FROM_ANNOTATION)
        if (metadata.get("annotations") or {}).get(RECREATED_FROM_ANNOTATION) == replaced:
            return "ours"
        if metadata.get("uid") != replaced:
            return "other"
        return "deleting" if metadata.get("deletionTimestamp") else "old"

    def _pending_path(self, key: WorkloadKey) -> str:
        return CONFIGMAPS.object_path(self.pending_jobs_namespace, pending_job_name(key))

    async def _keep_pending(
        self, key: WorkloadKey, body: dict[str, Any], decision: Decision
    ) -> None:
        """Store the Job to create in a ConfigMap in the controller's namespace, then in memory.

        A copy left by an earlier attempt (whose cleanup failed) is replaced. Without a copy the
        Job is not deleted: the restart fails with the reason (a missing namespace is reported as
        a permanent error, not as "the workload is gone").
        """
        namespace = self.pending_jobs_namespace
        configmap = pending_job_configmap(body, namespace=namespace)
        try:
            try:
                await self._api.create(CONFIGMAPS.collection_path(namespace), configmap)
            except ApiConflict:
                await self._api.delete(self._pending_path(key))
                await self._api.create(CONFIGMAPS.collection_path(namespace), configmap)
        except ApiError as error:
            where = f"cannot keep a copy of the job in namespace {namespace} before deleting it"
            cause: ApiError = type(error)(error.status, error.reason, f"{where}: {error.message}")
            if isinstance(error, ApiNotFound):  # the namespace: set --controller-namespace
                missing = f"{where}: it does not exist (see --controller-namespace)"
                cause = ApiInvalid(error.status, error.reason, missing)
            raise RestartFailed(key, decision, cause) from error
        self._unborn_jobs[key] = body

    async def _drop_pending(self, key: WorkloadKey, decision: Decision) -> None:
        """Forget the copy: the ConfigMap first, so that a failure keeps the memory entry and the
        retry comes back here rather than leaving a ConfigMap a later start would act on."""
        try:
            await self._api.delete(self._pending_path(key))
        except ApiNotFound:
            pass
        except ApiError as error:
            raise RestartFailed(key, decision, error) from error
        self._unborn_jobs.pop(key, None)

    async def resume_pending_jobs(self) -> list[WorkloadKey]:
        """At start-up: Jobs a previous run deleted for re-creation and did not create again (it
        died, lost the delete's answer, or the server refused the new Job). Their copies go back
        into ``_unborn_jobs``; the caller queues the keys and ``sync`` finishes each creation."""
        params = [("labelSelector", PENDING_JOB_LABEL)]
        path = CONFIGMAPS.collection_path(self.pending_jobs_namespace)
        page = await self._api.list_page(path, params=params)
        keys = []
        for item in page.get("items", []):
            found = pending_job(item)
            if found is None:
                name = item.get("metadata", {}).get("name")
                log.warning("unreadable pending job copy; left alone", extra={"configmap": name})
                continue
            key, body = found
            self._unborn_jobs[key] = body
            keys.append(key)
        return keys

    async def _rollout_env_vars(
        self, workload: WorkloadSnapshot, decision: Decision, change: Mapping[str, Any]
    ) -> None:
        """Rollouts take merge patches only, which replace lists whole: send every container."""
        rollout = await self._get(workload, decision)
        spec: dict[str, Any] = dict(rollout.get("spec") or {})
        pod_spec = (spec.get("template") or {}).get("spec") or {}
        containers = env_containers(list(pod_spec.get("containers") or []), change)
        patch = record_patch(workload, decision)
        patch["spec"] = {"template": {"spec": {"containers": containers}}}
        await self._patch(workload, patch, decision)

    def _restarted(self, workload: WorkloadSnapshot, decision: Decision) -> None:
        key = workload.key
        self._deferrals.pop(key, None)
        self._metrics.count_reload(namespace=key.namespace, success=True)
        self._metrics.action_total.labels(workload_kind=key.kind, result="success").inc()
        since = self._changed_since(key)
        if since is not None:
            self._metrics.action_latency.labels(workload_kind=key.kind).observe(
                max(0.0, time.monotonic() - since)
            )
        configs = ", ".join(decision.triggers)
        log.info("restarted workload", extra=_fields(key, configs=configs))
        message = f"Changes detected in {configs}; restarted {key.kind} {key.name}"
        self.emit_event(workload, reason="Reloaded", message=message, warning=False)
        if workload.paused and workload.paused_at is None:
            # Paused by someone else: the template changed, but nothing rolls until they resume.
            postponed = f"{key.kind} is paused: the restart for {configs} rolls out once resumed"
            self.emit_event(workload, reason="ReloadPostponed", message=postponed, warning=True)
        if self._notifier is not None:
            self._notifier.alert_nowait(self._reload(workload, decision))  # queued, never waits

    def _report_problems(self, workload: WorkloadSnapshot) -> None:
        """Invalid annotations: one log line and one Warning Event per distinct problem set.

        One Event lists them all: a list of 64 bad patterns must not become 64 Events on every
        edit. Each value is already cut short (``Problem.value``); the list is cut after a few
        problems, so the message stays within what an Event shows.
        """
        problems = tuple(workload.problems)
        if self._reported.get(workload.key, ()) == problems:
            return
        if not problems:  # only workloads with problems have an entry: most have none
            del self._reported[workload.key]
            return
        self._reported[workload.key] = problems
        listed = "; ".join(problem.text for problem in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        message = f"{len(problems)} invalid annotation value(s) ignored: {listed}{more}"
        log.warning("invalid annotations", extra=_fields(workload.key, problems=message))
        self._metrics.errors.labels(type="invalid_annotation").inc(len(problems))
        self.emit_event(workload, reason="InvalidAnnotation", message=message, warning=True)

    def _report_deferral(self, workload: WorkloadSnapshot, decision: Decision) -> None:
        """A restart held back leaves a Normal Event: storm control at work, not a fault, and the
        restart follows by itself. Once per held-back restart: a config flapping under the
        minimum interval syncs the workload again at every change, and each of those used to
        PATCH the Event's count. The message names no time left, so each later held-back
        restart raises the one Event's count."""
        if self._deferrals.get(workload.key) == decision.triggers:
            return
        self._deferrals[workload.key] = decision.triggers
        last, interval = workload.last_restart_at, self._policy.min_interval
        if last is not None and last + interval > self._clock():
            why = f"less than {interval:g}s since the last restart (minimum restart interval)"
        else:
            why = "waiting for its turn under the global restart rate"
        message = f"Restart for changes in {', '.join(decision.triggers)} postponed: {why}"
        self.emit_event(workload, reason="ReloadDeferred", message=message, warning=False)

    def emit_event(
        self, workload: WorkloadSnapshot, *, reason: str, message: str, warning: bool
    ) -> None:
        """Hand an Event to the recorder, which deduplicates it and writes it in the background:
        this never waits for the server, so Events cannot slow restarts down."""
        key = workload.key
        resource = KINDS[key.kind].resource
        subject = Subject(
            api_version=f"{resource.group}/{resource.version}",
            kind=key.kind,
            namespace=key.namespace,
            name=key.name,
            uid=workload.uid,
        )
        self.events.emit(subject, reason=reason, message=message, warning=warning)


class RestartFailed(Exception):
    """A write failed; carries what was attempted so the worker can log it with context."""

    def __init__(self, key: WorkloadKey, decision: Decision, error: ApiError) -> None:
        super().__init__(f"{decision.action} of {key} failed: {error}")
        self.key, self.decision, self.error = key, decision, error


def _no_record_found(workload: WorkloadSnapshot) -> bool:
    """No record annotation on the object as the snapshot saw it (a record set aside was one)."""
    recorded = workload.recorded
    return recorded is None or (not recorded.usable and recorded.reset is None)


def _fields(key: WorkloadKey, **more: object) -> dict[str, object]:
    # ``name`` is a reserved LogRecord attribute, hence ``workload``.
    return {"workload": f"{key.kind}/{key.name}", "namespace": key.namespace, **more}


_RETRYABLE_CLIENT_ERRORS = frozenset({401, 408, 409, 410, 429})
"""4xx answers a retry can cure: credentials about to be refreshed, a timeout, a stale read,
throttling. Every other 4xx to a write (403 above all) will be the same next time."""


def permanent_for_writes(error: ApiError) -> bool:
    """Whether retrying the same write cannot help.

    The error tree marks 403 retryable because a watch recovers once RBAC is fixed; a write refused
    by RBAC, retried by the queue, becomes an endless stream of 403s with nothing reported. So a
    write treats it as permanent: reported once, and tried again only when the workload or its
    configs change (that is when someone may have fixed the grant too).
    """
    if not error.retryable:
        return True
    return 400 <= error.status < 500 and error.status not in _RETRYABLE_CLIENT_ERRORS


_DENIED = re.compile(r'cannot ([a-z]+) resource "([a-z0-9./-]+)"(?: in API group "([a-z0-9.-]*)")?')


def denied_permission(error: ApiError) -> str:
    """``"patch deployments.apps"``: the permission an RBAC 403 names in its message ("" if none).

    The authorizer's message is the only place the server says which verb on which resource it
    refused (the Status details carry neither), and it is the grant an operator has to add.
    """
    if not isinstance(error, ApiForbidden):
        return ""
    found = _DENIED.search(error.message)
    if found is None:
        return ""
    verb, resource, group = found.groups()
    return f"{verb} {resource}.{group}" if group else f"{verb} {resource}"


MAX_SYNCS_IN_FLIGHT = 64
"""Syncs in flight over all workers at most: the API client's pool holds 100 connections, and
lists, Events and the Lease need some of them."""


def syncs_per_worker(*, workers: int, restart_burst: int) -> int:
    """Keys one worker syncs at once: all workers together as many as the restart budget lets
    out at once (its burst), within ``MAX_SYNCS_IN_FLIGHT``; at least one each.

    A sync is mostly waiting for the API server (a patch takes 20 ms to 300 ms), so four workers
    one key at a time capped a fan-out at about 4 / latency restarts a second, well under the
    global restart rate they are meant to be held to. The rate is the token bucket's job; this
    only bounds the requests in flight."""
    return max(1, min(restart_burst, MAX_SYNCS_IN_FLIGHT) // max(1, workers))


async def run_worker(
    *,
    queue: WorkQueue[WorkloadKey],
    restarter: Restarter,
    metrics: Metrics,
    settled: Callable[[WorkloadKey], None],
    parallel: int,
) -> None:
    """Pop keys until the queue shuts down, syncing up to ``parallel`` of them at once; retries
    belong to the queue, not to ``sync``. The queue never hands out a key that is being synced,
    so two syncs of one workload never overlap. After the shutdown, syncs under way finish."""
    slots = asyncio.Semaphore(parallel)

    def finished(key: WorkloadKey, _: asyncio.Task[None]) -> None:
        # A callback, not a ``finally``: it also runs for a task cancelled before it started.
        queue.done(key)
        slots.release()

    async with asyncio.TaskGroup() as group:
        while True:
            await slots.acquire()
            try:
                key = await queue.get()
            except QueueShutDown:
                slots.release()
                return
            sync = _sync_one(
                key, queue=queue, restarter=restarter, metrics=metrics, settled=settled
            )
            group.create_task(sync).add_done_callback(partial(finished, key))
            # get() and a sync that decides "nothing" never suspend: without this, a worker going
            # through thousands of ready keys would hold the loop, and watches and probes would
            # starve.
            await asyncio.sleep(0)


async def _sync_one(
    key: WorkloadKey,
    *,
    queue: WorkQueue[WorkloadKey],
    restarter: Restarter,
    metrics: Metrics,
    settled: Callable[[WorkloadKey], None],
) -> None:
    try:
        outcome = await restarter.sync(key)
    except RestartFailed as failure:
        await _failed(queue, restarter, failure, metrics)
    else:
        queue.forget(key)
        if outcome.requeue_after > 0:
            queue.add(key, delay=outcome.requeue_after)
        else:
            settled(key)


async def _failed(
    queue: WorkQueue[WorkloadKey], restarter: Restarter, failure: RestartFailed, metrics: Metrics
) -> None:
    key, error = failure.key, failure.error
    metrics.errors.labels(type=type(error).__name__).inc()
    if not permanent_for_writes(error):
        # A 409 is the design at work (a cache one write behind, or a workload edited meanwhile):
        # the retry decides again on fresh state. Only one that keeps coming back is news.
        expected = (
            isinstance(error, ApiConflict) and queue.num_requeues(key) < CONFLICTS_BEFORE_WARNING
        )
        level = logging.DEBUG if expected else logging.WARNING
        waits = {"retry_after": error.retry_after} if error.retry_after is not None else {}
        log.log(level, "write failed; will retry", extra=_fields(key, error=str(error), **waits))
        metrics.retries.inc()
        queue.retry(key, not_before=error.retry_after or 0.0)
        return
    # Permanent (RBAC, or the server rejects the write itself): retrying cannot help. Absorb it,
    # loudly; the next change to the workload or its configs queues it again.
    permission = denied_permission(error)
    fields = _fields(key, error=str(error), missing_permission=permission or None)
    log.error("write failed for good", extra=fields)
    metrics.action_total.labels(workload_kind=key.kind, result="error").inc()
    queue.forget(key)
    workload = restarter.current(key)
    if workload is not None:
        message = f"{failure.decision.action} failed: {error}"
        if permission:
            message += f" (grant the controller: {permission})"
        restarter.emit_event(workload, reason="ReloadFail", message=message, warning=True)
