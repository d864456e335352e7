"""Informer: one shared list+watch per resource kind feeding a local store of snapshots.

It follows client-go's reflector (``tools/cache/reflector.go``), which has years of edge cases
behind it:

- Every LIST is a consistent read (``resourceVersion=""``), paged with ``limit``/``continue``;
  the WATCH starts from the list's resourceVersion with ``allowWatchBookmarks=true`` and a random
  ``timeoutSeconds`` in [300, 600) so many clients do not reconnect at once.
- A watch that ends normally is resumed from the last resourceVersion seen (events and bookmarks
  both advance it), without a relist. A watch that ended without an event or bookmark, or within
  ``MIN_WATCH_SECONDS``, is reopened only after a backoff (a proxy that closes every watch at once
  must not get a request per round trip); a healthy watch resets the backoff.
- 410 Gone (in the stream or on the request) means the server no longer has history that old: the
  informer relists, paged, from "" (see ``_list`` for why not "not older than"). A relist replaces
  this scope's part of the store and **synthesises a delete** for every object that vanished in
  the gap, so subscribers never keep a ghost.
- Any failure, of a watch or of a list (the relist after 410 included), backs off exponentially
  with jitter (0.8 s doubling to 30 s) and retries; it never ends the loop, and it never changes the
  store: deletes are synthesised only from a list that succeeded. A 403 after the first sync keeps
  the store as it was (revoked RBAC says nothing about the objects); before it, the scope counts
  as listed and empty so one missing RoleBinding does not hold the other namespaces hostage.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from reloader.kube import (
    Api,
    ApiError,
    ApiForbidden,
    ApiGone,
    ApiNotFound,
    ApiUnavailable,
    PageTooLarge,
    classify,
    wait_before_retry,
)
from reloader.model import RawObject, Resource
from reloader.pages import BadListBody
from reloader.table import PackedTable

log = logging.getLogger("reloader.watch")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

ALL_NAMESPACES: None = None
PAGE_SIZE = 500
"""The most objects one list page asks for; an informer may ask for fewer (``page_size``)."""
WORKLOAD_PAGE_SIZE = 100
"""A page of workloads decodes into many small objects (pod specs, ``managedFields``), all at once,
and the snapshots made from it are allocated among them; the allocator cannot hand back an arena
that still holds one snapshot, so what a page held decoded stays resident after it is dropped. At
500 a page the scale run's steady RSS was 85.5 MiB, at 100 79.6 MiB (about 280 B per cached object
less) for 16 more list requests over 2,000 Deployments (docs/performance.md)."""
CONFIG_PAGE_SIZE = 250
"""ConfigMaps and Secrets carry their values in every list body (up to 1 MiB each): a smaller page
bounds what one list holds decoded at once, and so what the allocator keeps after it. With at most
``kube.LIST_PAGES_IN_FLIGHT`` pages read at a time, the steady RSS delta at 10k + 10k configs and 2k
Deployments fell from 2,081 to 1,701 B per cached object (docs/performance.md). 100 a page did a
little better on memory, but the start-up lists took five times as many requests and, on a busy
server, five times as long."""
PAGE_TARGET_BYTES = 4 * 2**20
"""The body size a list page aims at. A page's ``limit`` counts objects, which may be 100 bytes or
1 MiB each: after each page the next one asks for as many objects as fit this size (never more
than the informer's page size), so memory during a list does not grow with the objects' size."""
PAGE_MAX_BYTES = 16 * 2**20
"""A page body larger than this is dropped as it arrives and asked for again with an eighth of the
objects: the first page of a list of huge Secrets must not be read and decoded whole (250 objects
of 1 MiB would be 250 MiB of JSON, then several times that decoded). One object is at most what
etcd stores (1.5 MiB by default), so a page of one always fits."""
FORBIDDEN = "forbidden to list or watch; check the RBAC of the controller's account"
RETRYING = "watch failed; retrying"
ABSENT_RECHECK_SECONDS = 30.0
"""How often an optional kind (a CRD) that the server does not serve is looked for again."""
MIN_WATCH_SECONDS = 1.0
"""A watch that ends sooner than this (or without any event or bookmark) did no useful work: the
next one waits for the backoff. A healthy server ends a watch after its 300-600 s timeout."""


Unseen = dict[str, set[str]]
"""Namespace → names stored when a list began and not yet found in its pages: what the list will
delete when it ends. Empty on the first list, so that one keeps no name of what it reads."""
Namespace = MutableMapping[str, Any]
"""One namespace of a store: name → snapshot, or name → packed bytes in a ``PackedTable``."""


class Subscriber(Protocol[T_contra]):
    def __call__(self, old: T_contra | None, new: T_contra | None, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Packing(Generic[T]):
    """How a store keeps one kind's snapshots as bytes, each namespace in one ``PackedTable``.

    At 20,000 cached configs a snapshot object, its name string and a dict entry were about 200 B
    on top of its digests; the namespace and name are the store's own keys, so a packed value
    needs to hold only the rest, and the table keeps name and value in one buffer. ``unpack``
    gets the snapshot back for a reader; what it builds lives as long as the reader holds it."""

    pack: Callable[[T], bytes]
    unpack: Callable[[str, str, bytes], T]
    """(namespace, name, packed value) → the snapshot."""


class _Unpacked(Mapping[str, T]):
    """One namespace of a packed store, read as name → snapshot (a live view: do not keep)."""

    __slots__ = ("_namespace", "_packed", "_unpack")

    def __init__(
        self, namespace: str, packed: Namespace, unpack: Callable[[str, str, bytes], T]
    ) -> None:
        self._namespace, self._packed, self._unpack = namespace, packed, unpack

    def __getitem__(self, name: str) -> T:
        return self._unpack(self._namespace, name, self._packed[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


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

    def reset(self) -> None:
        """Start again from the initial delay: the connection has proven healthy since."""
        self._current = self._initial


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


@dataclass(slots=True)
class _WatchProgress:
    """What one watch connection achieved: healthy means it delivered an event or a bookmark and
    lived at least ``MIN_WATCH_SECONDS``. Anything less must not be reopened at once."""

    started: float
    progressed: bool = False

    def healthy(self) -> bool:
        return self.progressed and time.monotonic() - self.started >= MIN_WATCH_SECONDS


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
        packing: Packing[T] | None = None,
        page_size: int = PAGE_SIZE,
        refresh: Callable[[T, RawObject], T | None] | None = None,
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
        self._packing = packing
        self._refresh = refresh
        """(stored snapshot, raw object) → the snapshot brought up to date without a transform,
        or None when the object must be transformed whole."""
        self._page_limit = page_size
        self._limit_hint: int | None = None
        """The limit the last list page ended on: a relist of huge objects starts there rather than
        dropping its first page again."""
        self._store: dict[str, Namespace] = {}
        """Namespace → name → snapshot, or its packed form in a ``PackedTable`` with ``packing``."""
        self._subscribers: list[Subscriber[T]] = []
        self._synced_scopes: set[str | None] = set()
        self._synced = asyncio.Event()
        self._relists = self._restarts = self._events = 0
        self._last_contact = time.monotonic()

    # --- reading the store ------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> T | None:
        return self._read(namespace, name, self._store.get(namespace, {}).get(name))

    def in_namespace(self, namespace: str) -> Mapping[str, T]:
        """Name → snapshot for one namespace (a live view: do not mutate or keep)."""
        objects = self._store.get(namespace, {})
        if self._packing is None:
            return cast(dict[str, T], objects)
        return _Unpacked(namespace, objects, self._packing.unpack)

    def compact(self) -> None:
        """Give packed namespaces buffers of their exact size (after the first sync: a buffer
        grown by appending keeps up to an eighth more than it holds)."""
        for objects in self._store.values():
            if isinstance(objects, PackedTable):
                objects.compact()

    def values(self) -> Iterator[T]:
        for namespace in self._store:
            yield from self.in_namespace(namespace).values()

    def _read(self, namespace: str, name: str, stored: object | None) -> T | None:
        if stored is None or self._packing is None:
            return cast("T | None", stored)
        return self._packing.unpack(namespace, name, cast(bytes, stored))

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
        """List and watch one scope until cancelled; no API error ends it.

        Every request, the relist after 410 included, sits inside the one ``try``, so each failure
        backs off and retries the step that failed: the list while ``version`` is None, else the
        watch from ``version``. An error never removes anything from the store.
        """
        backoff = Backoff()
        version: str | None = None  # None: (re)list before watching
        while True:
            listed = version is None
            try:
                if version is None:
                    version = await self._list(namespace)
                version = await self._watch(namespace, version, backoff)
            except _Relist:
                version = None
                await self._relisting(namespace, backoff if listed else None)
            except ApiNotFound as error:
                if not self._optional:
                    await self._retry_after(error, namespace, backoff)
                    continue
                await self._absent(namespace)
                version = None
            except ApiForbidden as error:
                await self._forbidden(error, namespace, backoff)
            except ApiError as error:
                await self._retry_after(error, namespace, backoff)

    async def _relisting(self, namespace: str | None, backoff: Backoff | None) -> None:
        """Count and log a relist after 410. If the watch that expired was opened straight from a
        list, pause first: list, 410, list again at full speed would hammer the server."""
        self._relists += 1
        log.info(
            "watch expired; relisting",
            extra={"kind": self.resource.kind, "namespace": namespace or "*"},
        )
        if backoff is not None:
            await asyncio.sleep(backoff.next_delay())

    async def _absent(self, namespace: str | None) -> None:
        """A kind from a CRD that is not installed: nothing to cache, not an error. The scope
        counts as listed (empty); installing the CRD later is picked up at the next look."""
        if namespace not in self._synced_scopes:
            log.info(
                "resource not served; will check again",
                extra={"kind": self.resource.kind, "retry_in": ABSENT_RECHECK_SECONDS},
            )
        self._mark_synced(namespace)
        await asyncio.sleep(ABSENT_RECHECK_SECONDS)

    async def _forbidden(self, error: ApiError, namespace: str | None, backoff: Backoff) -> None:
        """RBAC does not let us read this scope (never granted, or revoked). Say so loudly, back
        off, and retry; the store keeps what it had, since a 403 says nothing about the objects
        (emptying it would send every subscriber a delete, and a restart storm with
        ``--reload-on-delete``). A scope never listed counts as listed and empty, so the other
        namespaces are not held hostage; it held nothing, so it can never delete anything later.
        """
        delay = self._failed(error, namespace, backoff, level=logging.ERROR, what=FORBIDDEN)
        self._mark_synced(namespace)
        await asyncio.sleep(delay)

    async def _retry_after(self, error: ApiError, namespace: str | None, backoff: Backoff) -> None:
        delay = self._failed(error, namespace, backoff, level=logging.WARNING, what=RETRYING)
        await asyncio.sleep(delay)

    def _failed(
        self, error: ApiError, namespace: str | None, backoff: Backoff, *, level: int, what: str
    ) -> float:
        """Count and log one failed list or watch; returns how long to back off."""
        self._restarts += 1
        delay = wait_before_retry(error, backoff.next_delay())
        fields = {
            "kind": self.resource.kind,
            "namespace": namespace or "*",
            "error": str(error),
            "retry_in": round(delay, 2),
        }
        log.log(level, what, extra=fields)
        return delay

    async def _pause_after_idle_watch(self, namespace: str | None, backoff: Backoff) -> None:
        """A watch that ended at once or without progress is reopened after the backoff only: a
        server or proxy that closes every watch immediately would otherwise get a hot loop."""
        self._restarts += 1
        delay = backoff.next_delay()
        log.warning(
            "watch ended without progress; reopening after a pause",
            extra={
                "kind": self.resource.kind,
                "namespace": namespace or "*",
                "retry_in": round(delay, 2),
            },
        )
        await asyncio.sleep(delay)

    def _base_params(self) -> list[tuple[str, str]]:
        return [("labelSelector", self._label_selector)] if self._label_selector else []

    def _page_size(self) -> int:
        return min(PAGE_SIZE, self._page_limit)

    async def _list(self, namespace: str | None) -> str:
        """LIST the scope into the store, paged; returns the list's resourceVersion.

        Each page is reduced to snapshots as it arrives, so a relist of 10k Secrets never holds
        more than one page of raw objects; objects not seen in any page are removed only once the
        last page has arrived (a list that fails half-way removes nothing). A page is bounded in
        bytes as well as objects: the limit follows the objects' size (``PAGE_TARGET_BYTES``), and a
        body past ``PAGE_MAX_BYTES`` is dropped unread and asked for again with fewer objects.

        The relist after 410 is also from "" rather than "not older than" the last version. Such a
        read is served from the watch cache, and only recent watch caches apply ``limit`` (1.37's
        ``computeListLimit`` does; older ones return every object in scope in one body, which is
        why client-go does not page them). A consistent read is paged by every server (by etcd, or
        by a recent watch cache), at the cost of a quorum read on old servers after a rare 410.
        """
        path = self.resource.collection_path(namespace)
        unseen = self._stored_names(namespace)
        version, continue_token = "", ""
        limit = min(self._limit_hint or self._page_size(), self._page_size())
        while True:
            params = [*self._base_params(), ("limit", str(limit))]
            if continue_token:
                params.append(("continue", continue_token))
            try:
                page = await self._api.list_objects(
                    path, params=params, max_bytes=PAGE_MAX_BYTES if limit > 1 else None
                )
            except PageTooLarge as error:
                limit = self._fewer(namespace, limit, error)
                continue
            try:
                self._upsert_page(page.objects(), unseen)
            except BadListBody as error:
                raise ApiUnavailable(0, "BadBody", str(error)) from error
            metadata = page.metadata
            limit = self._limit_hint = self._next_limit(page.count, page.size)
            del page  # not kept alive across the next request
            version = metadata.get("resourceVersion") or ""
            if not version:  # without it there is nothing to watch from: retry the list
                raise ApiUnavailable(0, "BadBody", "list response without a resourceVersion")
            continue_token = metadata.get("continue") or ""
            if not continue_token:
                break
        self._contact()
        self._remove_unseen(unseen)
        self._mark_synced(namespace)
        return str(version)

    def _fewer(self, namespace: str | None, limit: int, error: PageTooLarge) -> int:
        """The limit to ask again with after a page too large to read: an eighth of it."""
        fewer = max(1, limit // 8)
        log.info(
            "list page too large; asking for fewer objects",
            extra={
                "kind": self.resource.kind,
                "namespace": namespace or "*",
                "limit": limit,
                "bytes": error.size,
                "next_limit": fewer,
            },
        )
        return fewer

    def _next_limit(self, objects: int, size: int) -> int:
        """As many objects as fit ``PAGE_TARGET_BYTES`` at this page's size per object, at least
        one and at most the page size."""
        if not objects or not size:
            return self._page_size()
        return max(1, min(self._page_size(), PAGE_TARGET_BYTES * objects // size))

    async def _watch(self, namespace: str | None, resource_version: str, backoff: Backoff) -> str:
        """WATCH from ``resource_version`` until the server ends it; returns the last version.

        A healthy watch resets ``backoff``, so the next failure is retried quickly; a watch that
        ended without doing any work waits for it before the next one is opened.
        """
        low, high = self._watch_timeout_range
        params = [
            *self._base_params(),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(random.randint(low, high - 1))),
        ]
        path = self.resource.collection_path(namespace)
        progress = _WatchProgress(started=time.monotonic())
        try:
            async for event in self._api.watch(
                path, params=params, read_timeout=self._stall_timeout
            ):
                self._contact()
                resource_version = self._apply_event(event) or resource_version
                progress.progressed = True
                del event  # a Secret's raw object is not kept alive while waiting for the next
        except ApiGone as error:
            raise _Relist from error
        finally:
            if progress.healthy():
                backoff.reset()
        if not progress.healthy():
            await self._pause_after_idle_watch(namespace, backoff)
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

    def _snapshot(self, obj: RawObject, old: T | None) -> T | None:
        try:
            if old is not None and self._refresh is not None:
                refreshed = self._refresh(old, obj)
                if refreshed is not None:
                    return refreshed
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
        objects = self._store.get(namespace)
        old = objects.get(name) if objects is not None else None
        # Unpacked before the transform only for a refresh; else only if it is to be notified.
        previous = self._read(namespace, name, old) if self._refresh is not None else None
        new = self._snapshot(obj, previous)
        if new is None:
            return
        stored: object = new if self._packing is None else self._packing.pack(new)
        if objects is None:
            objects = self._store[namespace] = self._new_namespace()
        objects[name] = stored
        if old != stored:
            if previous is None:
                previous = self._read(namespace, name, old)
            self._notify(previous, new)

    def _new_namespace(self) -> Namespace:
        return {} if self._packing is None else PackedTable()

    def _remove(self, namespace: str, name: str) -> None:
        objects = self._store.get(namespace, {})
        old = self._read(namespace, name, objects.pop(name, None))
        if not objects:
            self._store.pop(namespace, None)
        if old is not None:
            self._notify(old, None)

    def _stored_names(self, namespace: str | None) -> Unseen:
        """The names in the scope of a list about to begin (``Unseen``)."""
        scope = [namespace] if namespace is not None else list(self._store)
        return {ns: set(self._store[ns]) for ns in scope if self._store.get(ns)}

    def _upsert_page(self, items: Iterable[RawObject], unseen: Unseen) -> None:
        """Each listed object into the store; none is kept alive while the next is decoded
        (``pages.ListPage``), so the next reuses what it leaves behind."""
        for obj in items:
            self._upsert_listed(obj, unseen)
            del obj

    def _upsert_listed(self, obj: RawObject, unseen: Unseen) -> None:
        if unseen:
            metadata = obj.get("metadata", {})
            names = unseen.get(metadata.get("namespace", ""))
            if names:
                names.discard(metadata.get("name", ""))
        self._upsert(obj)

    def _remove_unseen(self, unseen: Unseen) -> None:
        """Synthesise deletes for objects that vanished while we were not watching."""
        for namespace, names in unseen.items():
            for name in names:
                self._remove(namespace, name)

    def _notify(self, old: T | None, new: T | None) -> None:
        for subscriber in self._subscribers:
            subscriber(old, new)
