"""Secrets Store CSI driver (``--enable-csi-integration``): what each workload's pods hold.

With the CSI driver, a secret may reach a pod without any Secret object: the driver mounts it from
an external store (OpenBao, Vault, a cloud key vault) as a SecretProviderClass describes, and
records per pod and class a ``SecretProviderClassPodStatus`` (``secrets-store.csi.x-k8s.io/v1``)
listing each object's ``id`` and ``version``. When rotation is on, the driver updates those versions
in place. That is the signal: a SecretProviderClass is a config (``model.SPC``), referenced through
CSI volumes (``references.py``), and its content is the versions its pods report.

Why per workload, and why the newest pod. Hashing every version of a class across all of its
status objects would restart twice: during a rollout old and new pods hold different versions, so
the union changes again when the old pods go. Instead each workload gets its own view of each class
(kept under ``model.workload_config_name``): the versions reported by the **most recently created**
of its pods (creation time, then name). A new pod mounts the class as it is now, so that is what a
restart would give; old pods coming and going change nothing. With rotation, the driver updates
every pod within one rotation period, the newest included, and the workload restarts once then.
A workload with no reporting pod has no view at all (``decide.py``: not a dependency yet).

Versions are not secret values, but each is still kept only as a keyed digest (``digests.py``),
bound to the class's identity, like a ConfigMap's data; nothing here logs a status's contents.

Why a GET per pod instead of a Pod informer. A status names its pod (``status.podName``); the
workload is found through ownerReferences: Pod → ReplicaSet → Deployment (or Rollout), Pod → Job →
CronJob, or Pod → StatefulSet/DaemonSet/Job directly. A Pod informer would cache every pod in the
cluster to map the few that mount a class, and pods are the most numerous and most often updated
objects there are. Instead the owner is resolved once per pod with a GET (one more for its
ReplicaSet or Job, cached by that owner's uid, so a Deployment's pods cost one GET each) by a few
resolver tasks, and remembered per status object for as long as the status exists (it never moves
to another pod). The caches of pods and owners are bounded (``OWNER_CACHE_SIZE``).

Workers start only once every status listed at start-up has been placed (``wait_synced``): a view
still missing then would prune its entry from the workload's record, and a rotation made while the
controller was down would then be recorded instead of restarting.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from reloader.digests import DigestKey, KeyDigests, key_digests
from reloader.kube import Api, ApiError, ApiNotFound
from reloader.model import (
    KINDS,
    SPC,
    ConfigKey,
    ObjectKey,
    RawObject,
    Resource,
    WorkloadKey,
    workload_config_name,
)
from reloader.snapshots import ConfigSnapshot
from reloader.watch import Backoff, Informer

log = logging.getLogger("reloader.csi")

POD_STATUSES = Resource(
    group="secrets-store.csi.x-k8s.io",
    version="v1",
    plural="secretproviderclasspodstatuses",
    kind="SecretProviderClassPodStatus",
)
PODS = Resource(group="", version="v1", plural="pods", kind="Pod")
REPLICA_SETS = Resource(group="apps", version="v1", plural="replicasets", kind="ReplicaSet")
_INTERMEDIATES: Mapping[tuple[str, str], Resource] = {
    ("apps", "ReplicaSet"): REPLICA_SETS,
    ("batch", "Job"): KINDS["Job"].resource,
}
"""Owners between a pod and its workload: their own controller is the workload, when they have one
(a Job without a CronJob is the workload itself)."""

OWNER_CACHE_SIZE = 10_000
"""Pods and ReplicaSets/Jobs whose workload is remembered; the oldest are forgotten first."""
RESOLVERS = 4
"""Concurrent owner look-ups: a start with thousands of statuses is not one GET after another."""


@dataclass(frozen=True, slots=True)
class PodStatus:
    """What is kept of one SecretProviderClassPodStatus: no more than the view needs."""

    namespace: str
    name: str
    pod: str
    pod_uid: str
    """From the status's ownerReferences (the driver sets them); "" if absent."""
    spc: str
    created: str
    """``metadata.creationTimestamp``, RFC 3339 in UTC, so it orders as text."""
    versions: KeyDigests
    """One keyed digest per object id, of its version."""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    @property
    def pod_id(self) -> str:
        """The owner cache's key for its pod: the pod's uid, else namespace/name."""
        return self.pod_uid or f"{self.namespace}/{self.pod}"

    @property
    def reports(self) -> bool:
        """Whether it names its pod and class and lists at least one object."""
        return bool(self.pod and self.spc and len(self.versions) > 1)


def pod_status(obj: RawObject, *, key: DigestKey) -> PodStatus:
    """The transform: a raw status → ``PodStatus``; versions are digested here and go no further."""
    metadata = obj.get("metadata", {})
    namespace = metadata.get("namespace", "")
    status = _mapping(obj.get("status"))
    spc = _text(status.get("secretProviderClassName"))
    objects = [o for o in status.get("objects") or [] if isinstance(o, dict)]
    versions = {_text(o.get("id")): _text(o.get("version")) for o in objects if _text(o.get("id"))}
    return PodStatus(
        namespace=namespace,
        name=metadata.get("name", ""),
        pod=_text(status.get("podName")),
        pod_uid=_pod_uid(metadata.get("ownerReferences")),
        spc=spc,
        created=metadata.get("creationTimestamp", ""),
        versions=key_digests(versions, None, key=key, config=ConfigKey(SPC, namespace, spc)),
    )


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _pod_uid(references: object) -> str:
    for ref in references if isinstance(references, list) else []:
        if isinstance(ref, dict) and ref.get("kind") == "Pod" and ref.get("apiVersion") == "v1":
            return _text(ref.get("uid"))
    return ""


def _controller(obj: RawObject) -> dict[str, Any] | None:
    """The owner reference marked ``controller: true``: the one object that manages ``obj``."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") is True:
            return ref
    return None


def _group(api_version: object) -> str:
    """``apps/v1`` → ``apps``; ``v1`` → "" (core)."""
    text = _text(api_version)
    return text.rpartition("/")[0]


def _workload(namespace: str, ref: Mapping[str, Any]) -> WorkloadKey | None:
    """The workload an owner reference names, if it is a kind this controller restarts."""
    for kind in KINDS.values():
        if kind.resource.kind == ref.get("kind") and kind.resource.group == _group(
            ref.get("apiVersion")
        ):
            return WorkloadKey(kind.name, namespace, _text(ref.get("name")))
    return None


class _Lru:
    """A bounded map of resolved owners (None: resolved to no workload)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, WorkloadKey | None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> WorkloadKey | None:
        """The owner; None also when not cached (ask ``in`` first)."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str, owner: WorkloadKey | None) -> None:
        self._items[key] = owner
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


Changed = Callable[[WorkloadKey, ConfigKey], None]
"""Told when one workload's view of one class changed (the app enqueues the workload)."""


class PodStatuses:
    """The status informer, each status's workload, and per workload the view of each class."""

    def __init__(
        self,
        *,
        api: Api,
        digest_key: DigestKey,
        changed: Changed,
        namespaces: Sequence[str] | None = None,
        namespace_filter: Callable[[str], bool] | None = None,
        stall_timeout: float = 70.0,
        cache_size: int = OWNER_CACHE_SIZE,
    ) -> None:
        self._api = api
        self._changed = changed
        self.informer = Informer[PodStatus](
            api=api,
            resource=POD_STATUSES,
            transform=partial(pod_status, key=digest_key),
            namespaces=namespaces,
            namespace_filter=namespace_filter,
            stall_timeout=stall_timeout,
            optional=True,
        )
        self.informer.subscribe(self._on_status)
        self._owners = _Lru(cache_size)
        self._owner_of: dict[ObjectKey, WorkloadKey | None] = {}
        """Every resolved status → its workload (None: no workload of ours)."""
        self._groups: dict[tuple[WorkloadKey, str], dict[str, PodStatus]] = {}
        """(workload, class) → its pods' statuses by status name."""
        self._views: dict[str, dict[str, ConfigSnapshot]] = {}
        """Namespace → ``workload_config_name`` → the view decide reads."""
        self._pending: asyncio.Queue[ObjectKey] = asyncio.Queue()
        self._queued: set[ObjectKey] = set()
        self._startup: set[ObjectKey] = set()
        """Statuses of the initial list not placed yet: workers wait for them."""
        self._placed = asyncio.Event()

    # --- reading -----------------------------------------------------------------------------

    def in_namespace(self, namespace: str) -> Mapping[str, ConfigSnapshot]:
        """``workload_config_name`` → view, for one namespace (what ``decide`` looks up)."""
        return self._views.get(namespace, {})

    @property
    def synced(self) -> bool:
        return self.informer.synced and not self._startup

    async def wait_synced(self) -> None:
        await self.informer.wait_synced()
        while self._startup:
            self._placed.clear()
            await self._placed.wait()

    # --- events ------------------------------------------------------------------------------

    def _on_status(self, old: PodStatus | None, new: PodStatus | None) -> None:
        """Place a status with its workload at once when its pod's owner is known; otherwise
        queue it for a resolver. Never blocks, never calls the API."""
        if old is not None and (new is None or new.spc != old.spc):
            self._unplace(old)
        if new is None:
            assert old is not None
            self._owner_of.pop(old.key, None)
            self._done(old.key)
            return
        if new.key in self._owner_of:
            self._place(new)
            return
        if new.pod_id in self._owners:
            self._owner_of[new.key] = self._owners.get(new.pod_id)
            self._place(new)
            return
        if not self.informer.synced:
            self._startup.add(new.key)
        if new.key not in self._queued:
            self._queued.add(new.key)
            self._pending.put_nowait(new.key)

    def _place(self, status: PodStatus) -> None:
        owner = self._owner_of.get(status.key)
        if owner is None:
            return
        group = self._groups.setdefault((owner, status.spc), {})
        group[status.name] = status
        self._refresh(owner, status.spc)

    def _unplace(self, status: PodStatus) -> None:
        owner = self._owner_of.get(status.key)
        if owner is None:
            return
        group = self._groups.get((owner, status.spc), {})
        group.pop(status.name, None)
        if not group:
            self._groups.pop((owner, status.spc), None)
        self._refresh(owner, status.spc)

    def _refresh(self, owner: WorkloadKey, spc: str) -> None:
        """Recompute one workload's view of one class; tell the app if it changed."""
        reporting = [s for s in self._groups.get((owner, spc), {}).values() if s.reports]
        namespace, name = owner.namespace, workload_config_name(spc, owner)
        views = self._views.setdefault(namespace, {})
        before = views.get(name)
        if reporting:
            newest = max(reporting, key=lambda s: (s.created, s.name))
            views[name] = ConfigSnapshot(SPC, namespace, spc, newest.versions, False, False)
        else:
            views.pop(name, None)
            if not views:
                self._views.pop(namespace, None)
        if views.get(name) != before:
            self._changed(owner, ConfigKey(SPC, namespace, spc))

    def _done(self, key: ObjectKey) -> None:
        self._startup.discard(key)
        if not self._startup:
            self._placed.set()

    # --- resolving owners ----------------------------------------------------------------------

    async def resolve(self, workers: int = RESOLVERS) -> None:
        """Run the resolvers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(self._resolver(), name="csi-owners")

    async def _resolver(self) -> None:
        backoff = Backoff()
        while True:
            key = await self._pending.get()
            self._queued.discard(key)
            status = self.informer.get(key.namespace, key.name)
            if status is None or key in self._owner_of:
                self._done(key)
                continue
            try:
                owner = await self._resolve(status)
            except ApiError as error:
                delay = backoff.next_delay()
                log.warning(
                    "cannot find the workload of a pod's CSI status; retrying",
                    extra={"namespace": key.namespace, "pod": status.pod, "error": str(error)},
                )
                await asyncio.sleep(delay)
                if key not in self._queued:
                    self._queued.add(key)
                    self._pending.put_nowait(key)
                continue
            backoff.reset()
            self._resolved(key, owner)

    def _resolved(self, key: ObjectKey, owner: WorkloadKey | None) -> None:
        """Remember the owner and place the status as it is now (it may have changed meanwhile)."""
        status = self.informer.get(key.namespace, key.name)
        if status is not None:
            self._owners.put(status.pod_id, owner)
            self._owner_of[key] = owner
            self._place(status)
        self._done(key)

    async def _resolve(self, status: PodStatus) -> WorkloadKey | None:
        """Pod → its controller → (through a ReplicaSet or Job) the workload; None if none."""
        pod = await self._get(PODS, status.namespace, status.pod)
        if pod is None:
            return None
        if status.pod_uid and pod.get("metadata", {}).get("uid") != status.pod_uid:
            return None  # the status's pod is gone; another took its name
        ref = _controller(pod)
        if ref is None:
            return None
        intermediate = _INTERMEDIATES.get((_group(ref.get("apiVersion")), _text(ref.get("kind"))))
        if intermediate is None:
            return _workload(status.namespace, ref)
        return await self._through(intermediate, status.namespace, ref)

    async def _through(
        self, resource: Resource, namespace: str, ref: Mapping[str, Any]
    ) -> WorkloadKey | None:
        """The workload behind a ReplicaSet or Job, cached by its uid."""
        uid = _text(ref.get("uid"))
        if uid and uid in self._owners:
            return self._owners.get(uid)
        obj = await self._get(resource, namespace, _text(ref.get("name")))
        parent = _controller(obj) if obj is not None else None
        found = _workload(namespace, parent) if parent is not None else None
        if found is None and obj is not None and resource.kind == "Job":
            found = _workload(namespace, ref)  # a Job of its own is the workload
        if uid:
            self._owners.put(uid, found)
        return found

    async def _get(self, resource: Resource, namespace: str, name: str) -> RawObject | None:
        if not name:
            return None
        try:
            return await self._api.get(resource.object_path(namespace, name))
        except ApiNotFound:
            return None
