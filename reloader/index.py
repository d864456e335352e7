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
object and a set per config, a frozenset of keys per workload: about 7 MiB). Now a config costs one
dict entry whose value is the one dependent workload's key (a set only when several share the
config); the forward map is not stored but recomputed from the indexed snapshot, which the
informer keeps anyway. The entry's key is a name string, 50 to 100 bytes, and the config
informer's store keeps one with the same text: ``share_names`` makes the index use the store's
(at the first sync, for every config; later, for each config created), so a config's name is kept
once. A workload indexed later for a config nobody referenced before keeps a string of its own
until that config is created again or the controller restarts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from reloader.model import CONFIG_KINDS, ConfigKey, ConfigKind, WorkloadKey
from reloader.snapshots import ConfigSnapshot, WorkloadSnapshot

Dependents = WorkloadKey | set[WorkloadKey]
"""One workload's key, or a set of them when several depend on one config (the rare case)."""


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


def _members(dependents: Dependents | None) -> frozenset[WorkloadKey]:
    if dependents is None:
        return frozenset()
    if isinstance(dependents, WorkloadKey):
        return frozenset({dependents})
    return frozenset(dependents)


class ReferenceIndex:
    """Reverse (config → workloads) map, by (kind, namespace) then name; and the snapshot each
    workload was indexed with, from which its forward map is recomputed when it is re-indexed."""

    def __init__(self) -> None:
        self._dependents: dict[tuple[ConfigKind, str], dict[str, Dependents]] = {}
        self._indexed: dict[WorkloadKey, WorkloadSnapshot] = {}
        self._patterns: dict[tuple[ConfigKind, str], dict[WorkloadKey, WorkloadSnapshot]] = {}

    def dependents(self, config: ConfigKey) -> frozenset[WorkloadKey]:
        """Workloads that reference ``config`` or list it by exact name."""
        names = self._dependents.get((config.kind, config.namespace))
        return _members(names.get(config.name) if names is not None else None)

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
        if old is None and new is not None:
            self._share_name(config.kind, config.namespace, new.name)
        found = set(self.dependents(config))
        for key, workload in self._patterns.get((config.kind, config.namespace), {}).items():
            if workload.policy.wants(config.kind, config.name, referenced=False, match=False):
                found.add(key)
        return frozenset(found)

    def share_names(self, kind: ConfigKind, namespace: str, names: Iterable[str]) -> None:
        """Key this namespace's entries with these string objects (a config store's own keys)
        where the text is equal, so one string per config name is kept rather than two.

        The namespace's dict is built anew: taking each entry out and putting it back would leave
        as many dead slots as entries, and the dict would resize to twice its size."""
        indexed = self._dependents.get((kind, namespace))
        if not indexed:
            return
        shared = {name: indexed[name] for name in names if name in indexed}
        if shared:
            for name, dependents in indexed.items():
                shared.setdefault(name, dependents)  # an equal key already in keeps its object
            self._dependents[(kind, namespace)] = shared

    def _share_name(self, kind: ConfigKind, namespace: str, name: str) -> None:
        """One config created: its entry, if any, takes the store's string for its key."""
        indexed = self._dependents.get((kind, namespace))
        if indexed is not None and name in indexed:
            indexed[name] = indexed.pop(name)

    def _index(self, workload: WorkloadSnapshot) -> None:
        if not workload.policy.opted_in:
            return
        key = workload.key
        self._indexed[key] = workload
        for kind, name in _exact_dependencies(workload):
            names = self._dependents.setdefault((kind, key.namespace), {})
            present = names.get(name)
            if present is None:
                names[name] = key
            elif isinstance(present, set):
                present.add(key)
            elif present != key:
                names[name] = {present, key}
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
        if isinstance(present, set):
            present.discard(key)
            if len(present) == 1:
                names[name] = next(iter(present))
        elif present == key:
            del names[name]
        if not names:
            del self._dependents[(kind, namespace)]
