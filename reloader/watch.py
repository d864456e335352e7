"""Informer: one shared list+watch per resource kind feeding a local store of snapshots.

It follows client-go's reflector (``tools/cache/reflector.go``), which has years of edge cases
behind it:

- The first LIST is a consistent read (``resourceVersion=""``), paged with ``limit``/``continue``;
  the WATCH starts from the list's resourceVersion with ``allowWatchBookmarks=true`` and a random
  ``timeoutSeconds`` in [300, 600) so many clients do not reconnect at once.
- A watch that ends normally is resumed from the last resourceVersion seen (events and bookmarks
  both advance it), without a relist.
- 410 Gone (in the stream or on the request) means the server no longer has history that old: the
  informer relists, first "not older than" the last resourceVersion, and on a second 410 from "".
  A relist replaces this scope's part of the store and **synthesises a delete** for every object
  that vanished in the gap, so subscribers never keep a ghost.
- Any other failure backs off exponentially with jitter (0.8 s doubling to 30 s, reset after two
  quiet minutes) and retries; it never ends the loop.
- Stall watchdog: the server sends a bookmark about once a minute, so a connection silent for longer
  than ``stall_timeout`` is dead (a half-open TCP stream after an apiserver restart) and is dropped
  and reopened from the last resourceVersion.

Raw objects are turned into snapshots by ``transform`` before they are stored (the values of
ConfigMaps and Secrets never reach the store), and subscribers are told ``(old, new)`` in watch
order only when the snapshot actually changed. A subscriber must not block: the index updates
itself and enqueues keys.

Several namespaces (scoped mode) run one reflector each over one shared store.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from reloader.kube import Api, ApiError, ApiForbidden, ApiGone, ApiNotFound, classify
from reloader.model import ObjectKey, RawObject, Resource

log = logging.getLogger("reloader.watch")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

ALL_NAMESPACES: None = None
PAGE_SIZE = 500
ABSENT_RECHECK_SECONDS = 30.0
"""How often a scope we may not read (403), or an optional kind (a CRD) that the server does not
serve, is tried again."""


class Subscriber(Protocol[T_contra]):
    def __call__(self, old: T_contra | None, new: T_contra | None, /) -> None: ...


class Backoff:
    """Exponential backoff with full jitter, reset after a quiet period (client-go's defaults)."""

    def __init__(
        self,
        *,
        initial: float = 0.8,
        cap: float = 30.0,
        reset_after: float = 120.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial, self._cap, self._reset_after = initial, cap, reset_after
        self._rng = rng or random.Random()
        self._clock = clock
        self._current = initial
        self._last = -float("inf")

    def next_delay(self) -> float:
        now = self._clock()
        if now - self._last > self._reset_after:
            self._current = self._initial
        self._last = now
        delay = self._current * (1 + self._rng.random())
        self._current = min(self._current * 2, self._cap)
        return min(delay, self._cap)


@dataclass(frozen=True, slots=True)
class InformerStatistics:
    kind: str
    objects: int
    synced: bool
    relists: int
    restarts: int
    events: int
    seconds_since_contact: float


class _Relist(Exception):
    """Internal: the watch must be replaced by a relist (410 Gone)."""


class Informer(Generic[T]):
    """A cache of snapshots of one resource kind, kept current by list+watch."""

    def __init__(
        self,
        *,
        api: Api,
        resource: Resource,
        transform: Callable[[RawObject], T],
        namespaces: Sequence[str] | None = ALL_NAMESPACES,
        label_selector: str | None = None,
        namespace_filter: Callable[[str], bool] | None = None,
        stall_timeout: float = 70.0,
        watch_timeout_range: tuple[int, int] = (300, 600),
        optional: bool = False,
    ) -> None:
        self.resource = resource
        self._api = api
        self._transform = transform
        self._scopes: tuple[str | None, ...] = tuple(namespaces) if namespaces else (None,)
        self._label_selector = label_selector
        self._namespace_filter = namespace_filter
        self._stall_timeout = stall_timeout
        self._watch_timeout_range = watch_timeout_range
        self._optional = optional
        self._store: dict[str, dict[str, T]] = {}
        self._subscribers: list[Subscriber[T]] = []
        self._synced_scopes: set[str | None] = set()
        self._synced = asyncio.Event()
        self._relists = self._restarts = self._events = 0
        self._last_contact = time.monotonic()

    # --- reading the store ------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> T | None:
        return self._store.get(namespace, {}).get(name)

    def in_namespace(self, namespace: str) -> dict[str, T]:
        """Name → snapshot for one namespace (a live view: do not mutate)."""
        return self._store.get(namespace, {})

    def values(self) -> Iterator[T]:
        for objects in self._store.values():
            yield from objects.values()

    def __len__(self) -> int:
        return sum(len(objects) for objects in self._store.values())

    def subscribe(self, subscriber: Subscriber[T]) -> None:
        """Add a subscriber; must happen before ``run`` so it sees the initial list."""
        self._subscribers.append(subscriber)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def statistics(self) -> InformerStatistics:
        return InformerStatistics(
            kind=self.resource.kind,
            objects=len(self),
            synced=self.synced,
            relists=self._relists,
            restarts=self._restarts,
            events=self._events,
            seconds_since_contact=time.monotonic() - self._last_contact,
        )

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run one reflector per scope until cancelled."""
        async with asyncio.TaskGroup() as group:
            for scope in self._scopes:
                group.create_task(self._reflect(scope), name=f"watch-{self.resource.plural}")

    async def _reflect(self, namespace: str | None) -> None:
        backoff = Backoff()
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._list(namespace, resume_from=None)
                resource_version = await self._watch(namespace, resource_version)
            except _Relist:
                resource_version = await self._relist_or_none(namespace, resource_version)
            except ApiNotFound as error:
                if not self._optional:
                    await self._retry_after(error, namespace, backoff)
                    continue
                # A kind from a CRD that is not installed: nothing to cache, not an error. Look
                # again now and then, so installing the CRD later is picked up.
                if namespace not in self._synced_scopes:
                    log.info(
                        "resource not served; will check again",
                        extra={"kind": self.resource.kind, "retry_in": ABSENT_RECHECK_SECONDS},
                    )
                await self._empty_until_recheck(namespace)
                resource_version = None
            except ApiForbidden as error:
                # RBAC does not let us read this scope. Say so loudly, but do not hold the other
                # namespaces hostage: the scope counts as listed (empty) and is tried again later.
                self._restarts += 1
                log.error(
                    "forbidden to list or watch; check the RBAC of the controller's account",
                    extra={
                        "kind": self.resource.kind,
                        "namespace": namespace or "*",
                        "error": str(error),
                        "retry_in": ABSENT_RECHECK_SECONDS,
                    },
                )
                await self._empty_until_recheck(namespace)
                resource_version = None
            except ApiError as error:
                await self._retry_after(error, namespace, backoff)

    async def _empty_until_recheck(self, namespace: str | None) -> None:
        """A scope we cannot read counts as listed and empty; it is listed afresh after a while."""
        self._remove_unlisted(namespace, set())
        self._mark_synced(namespace)
        await asyncio.sleep(ABSENT_RECHECK_SECONDS)

    async def _retry_after(self, error: ApiError, namespace: str | None, backoff: Backoff) -> None:
        self._restarts += 1
        delay = backoff.next_delay()
        log.warning(
            "watch failed; retrying",
            extra={
                "kind": self.resource.kind,
                "namespace": namespace or "*",
                "error": str(error),
                "retry_in": round(delay, 2),
            },
        )
        await asyncio.sleep(delay)

    async def _relist_or_none(self, namespace: str | None, last: str | None) -> str | None:
        """Relist after 410: from the last resourceVersion, then (if that is gone too) from ""."""
        self._relists += 1
        log.info(
            "watch expired; relisting",
            extra={"kind": self.resource.kind, "namespace": namespace or "*"},
        )
        try:
            return await self._list(namespace, resume_from=last)
        except ApiGone:
            return await self._list(namespace, resume_from=None)

    def _base_params(self) -> list[tuple[str, str]]:
        return [("labelSelector", self._label_selector)] if self._label_selector else []

    async def _list(self, namespace: str | None, *, resume_from: str | None) -> str:
        """LIST the scope into the store; returns the list's resourceVersion.

        Each page is reduced to snapshots as it arrives, so a relist of 10k Secrets never holds
        more than one page of raw objects; objects not seen in any page are then removed.
        """
        path = self.resource.collection_path(namespace)
        listed: set[ObjectKey] = set()
        params = self._base_params()
        if resume_from:
            # Served from the watch cache, not older than what we had; client-go does not page it.
            params += [("resourceVersion", resume_from), ("resourceVersionMatch", "NotOlderThan")]
            page = await self._api.list_page(path, params=params)
            self._upsert_page(page.get("items") or [], listed)
            version = page["metadata"]["resourceVersion"]
        else:
            version, continue_token = "", ""
            while True:
                page_params = [*params, ("limit", str(PAGE_SIZE))]
                if continue_token:
                    page_params.append(("continue", continue_token))
                page = await self._api.list_page(path, params=page_params)
                self._upsert_page(page.get("items") or [], listed)
                version = page["metadata"]["resourceVersion"]
                continue_token = page["metadata"].get("continue") or ""
                if not continue_token:
                    break
        self._contact()
        self._remove_unlisted(namespace, listed)
        self._mark_synced(namespace)
        return str(version)

    async def _watch(self, namespace: str | None, resource_version: str) -> str:
        """WATCH from ``resource_version`` until the server ends it; returns the last version."""
        low, high = self._watch_timeout_range
        params = [
            *self._base_params(),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(random.randint(low, high - 1))),
        ]
        path = self.resource.collection_path(namespace)
        try:
            async for event in self._api.watch(
                path, params=params, read_timeout=self._stall_timeout
            ):
                self._contact()
                resource_version = self._apply_event(event) or resource_version
        except ApiGone as error:
            raise _Relist from error
        return resource_version

    def _apply_event(self, event: Any) -> str | None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            error = classify(int(obj.get("code") or 500), obj)
            if isinstance(error, ApiGone):
                raise _Relist from error
            raise error
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            return str(version) if version else None
        self._events += 1
        if kind in ("ADDED", "MODIFIED"):
            self._upsert(cast(RawObject, obj))
        elif kind == "DELETED":
            metadata = obj.get("metadata") or {}
            self._remove(metadata.get("namespace", ""), metadata.get("name", ""))
        return str(version) if version else None

    # --- store mutation and notification -----------------------------------------------------

    def _contact(self) -> None:
        self._last_contact = time.monotonic()

    def _mark_synced(self, namespace: str | None) -> None:
        self._synced_scopes.add(namespace)
        if len(self._synced_scopes) == len(self._scopes) and not self._synced.is_set():
            log.info("informer synced", extra={"kind": self.resource.kind, "objects": len(self)})
            self._synced.set()

    def _snapshot(self, obj: RawObject) -> T | None:
        try:
            return self._transform(obj)
        except Exception:  # one malformed object must not stop the stream for all others
            metadata = obj.get("metadata", {})
            log.exception(
                "could not read object; skipped",
                extra={
                    "kind": self.resource.kind,
                    "namespace": metadata.get("namespace"),
                    "object": metadata.get("name"),
                },
            )
            return None

    def _upsert(self, obj: RawObject) -> None:
        metadata = obj.get("metadata", {})
        namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
        if self._namespace_filter is not None and not self._namespace_filter(namespace):
            return  # ignored namespaces cost no memory
        new = self._snapshot(obj)
        if new is None:
            return
        objects = self._store.setdefault(namespace, {})
        old = objects.get(name)
        objects[name] = new
        if old != new:
            self._notify(old, new)

    def _remove(self, namespace: str, name: str) -> None:
        objects = self._store.get(namespace, {})
        old = objects.pop(name, None)
        if not objects:
            self._store.pop(namespace, None)
        if old is not None:
            self._notify(old, None)

    def _upsert_page(self, items: list[RawObject], listed: set[ObjectKey]) -> None:
        for obj in items:
            metadata = obj.get("metadata", {})
            listed.add(ObjectKey(metadata.get("namespace", ""), metadata.get("name", "")))
            self._upsert(obj)

    def _remove_unlisted(self, namespace: str | None, listed: set[ObjectKey]) -> None:
        """Synthesise deletes for objects that vanished while we were not watching."""
        scope = [namespace] if namespace is not None else list(self._store)
        for ns in scope:
            for name in [n for n in self._store.get(ns, {}) if ObjectKey(ns, n) not in listed]:
                self._remove(ns, name)

    def _notify(self, old: T | None, new: T | None) -> None:
        for subscriber in self._subscribers:
            subscriber(old, new)
