"""ReferenceIndex: which workloads depend on which configs, updated per event.

Guarantees:
- Updating the index for one workload costs O(its references), never a scan of the cluster; a
  config change finds its dependents with one dict lookup (plus the few workloads in that namespace
  whose named reload list holds a regular expression, which cannot be indexed by name).
- ``workload_changed`` and ``config_changed`` return the workload keys to look at again; the caller
  only enqueues them. Nothing here decides whether to restart: a key in the result means "its inputs
  may have changed", and the worker reads current state (level-triggered).
- A config that does not exist yet is indexed like any other: when it is created its dependents are
  found, so an optional reference made before its config is picked up.

Memory: at 20,000 referenced configs the index was the largest thing the controller kept (a key
object and a set per config, a frozenset of keys per workload: about 7 MiB). Now each (kind,
namespace) is one ``PackedTable``: a config's entry is its name and the names of its dependents
(a kind byte and the workload's name each; the namespace is the config's), about 50 bytes in two
buffers where a dict entry and a name string were about 120. The forward map is not stored but
recomputed from the indexed snapshot, which the informer keeps anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

from reloader.framing import frame, framed, text_of, unframed, utf8
from reloader.model import CONFIG_KINDS, ConfigKey, ConfigKind, WorkloadKey, WorkloadKindName
from reloader.snapshots import ConfigSnapshot, WorkloadSnapshot
from reloader.table import PackedTable

_WORKLOAD_KINDS: tuple[WorkloadKindName, ...] = get_args(WorkloadKindName)
PACKED_DEPENDENTS = 8
"""The most dependents a config's entry names itself; a config shared by more (one ConfigMap used
by every Deployment of a namespace) keeps them in a set, so adding the n-th costs O(1) rather
than a scan of the n - 1 before it."""
_CROWDED = b""
"""An entry's value when its dependents are in ``ReferenceIndex._crowded``."""


def _dependent(key: WorkloadKey) -> bytes:
    """One workload as a config's entry names it: its kind's index, then its name."""
    return bytes((_WORKLOAD_KINDS.index(key.kind),)) + utf8(key.name)


def _dependent_keys(namespace: str, entry: bytes) -> frozenset[WorkloadKey]:
    return frozenset(
        WorkloadKey(_WORKLOAD_KINDS[part[0]], namespace, text_of(part[1:]))
        for part in unframed(entry)
    )


@dataclass(frozen=True, slots=True)
class IndexStatistics:
    workloads: int
    configs: int
    pattern_workloads: int


def _exact_dependencies(workload: WorkloadSnapshot) -> Iterator[tuple[ConfigKind, str]]:
    """(kind, name) of every config the workload references or lists by exact name; a name may
    come twice (referenced and listed)."""
    for ref in workload.references:
        yield ref.kind, ref.name
    for kind in CONFIG_KINDS:
        for name in workload.policy.exact_names(kind):
            yield kind, name


def _needs_look(workload: WorkloadSnapshot) -> bool:
    """Opted in; or invalid annotations to report; or paused by us and due to be resumed."""
    return workload.policy.opted_in or bool(workload.problems) or workload.paused_at is not None


class ReferenceIndex:
    """Reverse (config → workloads) map, by (kind, namespace) then name; and the snapshot each
    workload was indexed with, from which its forward map is recomputed when it is re-indexed."""

    def __init__(self) -> None:
        self._dependents: dict[tuple[ConfigKind, str], PackedTable] = {}
        """(kind, namespace) → config name → its dependents, framed (``_dependent``), or
        ``_CROWDED``."""
        self._crowded: dict[ConfigKey, set[WorkloadKey]] = {}
        """The dependents of configs with more than ``PACKED_DEPENDENTS``."""
        self._indexed: dict[WorkloadKey, WorkloadSnapshot] = {}
        self._patterns: dict[tuple[ConfigKind, str], dict[WorkloadKey, WorkloadSnapshot]] = {}

    def dependents(self, config: ConfigKey) -> frozenset[WorkloadKey]:
        """Workloads that reference ``config`` or list it by exact name."""
        names = self._dependents.get((config.kind, config.namespace))
        entry = names.get(config.name) if names is not None else None
        if entry is None:
            return frozenset()
        if entry == _CROWDED:
            return frozenset(self._crowded[config])
        return _dependent_keys(config.namespace, entry)

    def dependencies(self, workload: WorkloadKey) -> frozenset[ConfigKey]:
        indexed = self._indexed.get(workload)
        if indexed is None:
            return frozenset()
        namespace = workload.namespace
        return frozenset(
            ConfigKey(kind, namespace, name) for kind, name in _exact_dependencies(indexed)
        )

    def statistics(self) -> IndexStatistics:
        return IndexStatistics(
            workloads=len(self._indexed),
            configs=sum(len(names) for names in self._dependents.values()),
            pattern_workloads=sum(len(group) for group in self._patterns.values()),
        )

    def workload_changed(
        self, old: WorkloadSnapshot | None, new: WorkloadSnapshot | None
    ) -> frozenset[WorkloadKey]:
        """Re-index one workload; it needs a look unless it was deleted."""
        current = new or old
        if current is None:
            return frozenset()
        key = current.key
        self._unindex(key)
        if new is None:
            return frozenset()
        self._index(new)
        return (
            frozenset({key}) if _needs_look(new) or (old and old.policy.opted_in) else frozenset()
        )

    def config_changed(
        self, old: ConfigSnapshot | None, new: ConfigSnapshot | None
    ) -> frozenset[WorkloadKey]:
        """The workloads whose inputs include this config."""
        snapshot = new or old
        if snapshot is None:
            return frozenset()
        config = snapshot.key
        found = set(self.dependents(config))
        for key, workload in self._patterns.get((config.kind, config.namespace), {}).items():
            if workload.policy.wants(config.kind, config.name, referenced=False, match=False):
                found.add(key)
        return frozenset(found)

    def compact(self) -> None:
        """Give every table buffers of their exact size (``PackedTable.compact``)."""
        for names in self._dependents.values():
            names.compact()

    def _index(self, workload: WorkloadSnapshot) -> None:
        if not workload.policy.opted_in:
            return
        key = workload.key
        self._indexed[key] = workload
        dependent = _dependent(key)
        for kind, name in _exact_dependencies(workload):
            names = self._dependents.get((kind, key.namespace))
            if names is None:
                names = self._dependents[(kind, key.namespace)] = PackedTable()
            present = names.get(name)
            if present is None:
                names[name] = frame(dependent)
            elif present == _CROWDED:
                self._crowded[ConfigKey(kind, key.namespace, name)].add(key)
            elif dependent not in (parts := unframed(present)):
                if len(parts) < PACKED_DEPENDENTS:
                    names[name] = present + frame(dependent)
                else:
                    crowd = _dependent_keys(key.namespace, present) | {key}
                    self._crowded[ConfigKey(kind, key.namespace, name)] = set(crowd)
                    names[name] = _CROWDED
        for kind in CONFIG_KINDS:
            if workload.policy.has_regex(kind):
                self._patterns.setdefault((kind, key.namespace), {})[key] = workload

    def _unindex(self, key: WorkloadKey) -> None:
        indexed = self._indexed.pop(key, None)
        if indexed is not None:
            for kind, name in _exact_dependencies(indexed):
                self._forget(kind, key.namespace, name, key)
        for kind in CONFIG_KINDS:
            group = self._patterns.get((kind, key.namespace))
            if group is not None and group.pop(key, None) is not None and not group:
                del self._patterns[(kind, key.namespace)]

    def _forget(self, kind: ConfigKind, namespace: str, name: str, key: WorkloadKey) -> None:
        names = self._dependents.get((kind, namespace))
        present = names.get(name) if names is not None else None
        if names is None or present is None:
            return
        remaining = self._without(ConfigKey(kind, namespace, name), present, key)
        if remaining is None:
            del names[name]
        elif remaining != present:
            names[name] = remaining
        if not names:
            del self._dependents[(kind, namespace)]

    def _without(self, config: ConfigKey, entry: bytes, key: WorkloadKey) -> bytes | None:
        """``config``'s entry once ``key`` no longer depends on it; None when nothing does."""
        if entry != _CROWDED:
            dependent = _dependent(key)
            parts = [part for part in unframed(entry) if part != dependent]
            return framed(parts) if parts else None
        crowd = self._crowded[config]
        crowd.discard(key)
        if crowd:
            return _CROWDED
        del self._crowded[config]
        return None
