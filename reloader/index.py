"""ReferenceIndex: which workloads depend on which configs, both ways, updated per event.

Guarantees:
- Updating the index for one workload costs O(its references), never a scan of the cluster; a
  config change finds its dependents with one dict lookup (plus the few workloads in that namespace
  whose named reload list holds a regular expression, which cannot be indexed by name).
- ``workload_changed`` and ``config_changed`` return the workload keys to look at again; the caller
  only enqueues them. Nothing here decides whether to restart: a key in the result means "its inputs
  may have changed", and the worker reads current state (level-triggered).
- A config that does not exist yet is indexed like any other: when it is created its dependents are
  found, so an optional reference made before its config is picked up.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from reloader.model import CONFIG_KINDS, ConfigKey, ConfigKind, WorkloadKey
from reloader.snapshots import ConfigSnapshot, WorkloadSnapshot


@dataclass(frozen=True, slots=True)
class IndexStatistics:
    workloads: int
    configs: int
    pattern_workloads: int


def _exact_dependencies(workload: WorkloadSnapshot) -> frozenset[ConfigKey]:
    namespace = workload.key.namespace
    keys = {ConfigKey(ref.kind, namespace, ref.name) for ref in workload.references}
    for kind in CONFIG_KINDS:
        keys.update(ConfigKey(kind, namespace, name) for name in workload.policy.exact_names(kind))
    return frozenset(keys)


def _needs_look(workload: WorkloadSnapshot) -> bool:
    """Opted in; or invalid annotations to report; or paused by us and due to be resumed."""
    return workload.policy.opted_in or bool(workload.problems) or workload.paused_at is not None


class ReferenceIndex:
    """Forward (workload → configs) and reverse (config → workloads) maps."""

    def __init__(self) -> None:
        self._dependents: dict[ConfigKey, set[WorkloadKey]] = defaultdict(set)
        self._dependencies: dict[WorkloadKey, frozenset[ConfigKey]] = {}
        self._patterns: dict[tuple[str, ConfigKind], dict[WorkloadKey, WorkloadSnapshot]] = {}

    def dependents(self, config: ConfigKey) -> frozenset[WorkloadKey]:
        """Workloads that reference ``config`` or list it by exact name."""
        return frozenset(self._dependents.get(config, ()))

    def dependencies(self, workload: WorkloadKey) -> frozenset[ConfigKey]:
        return self._dependencies.get(workload, frozenset())

    def statistics(self) -> IndexStatistics:
        return IndexStatistics(
            workloads=len(self._dependencies),
            configs=len(self._dependents),
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
        found = set(self._dependents.get(config, ()))
        for key, workload in self._patterns.get((config.namespace, config.kind), {}).items():
            if workload.policy.wants(config.kind, config.name, referenced=False, match=False):
                found.add(key)
        return frozenset(found)

    def _index(self, workload: WorkloadSnapshot) -> None:
        if not workload.policy.opted_in:
            return
        dependencies = _exact_dependencies(workload)
        self._dependencies[workload.key] = dependencies
        for config in dependencies:
            self._dependents[config].add(workload.key)
        for kind in CONFIG_KINDS:
            if workload.policy.has_regex(kind):
                group = self._patterns.setdefault((workload.key.namespace, kind), {})
                group[workload.key] = workload

    def _unindex(self, key: WorkloadKey) -> None:
        for config in self._dependencies.pop(key, frozenset()):
            dependents = self._dependents.get(config)
            if dependents is not None:
                dependents.discard(key)
                if not dependents:
                    del self._dependents[config]
        for kind in CONFIG_KINDS:
            group = self._patterns.get((key.namespace, kind))
            if group is not None and group.pop(key, None) is not None and not group:
                del self._patterns[(key.namespace, kind)]
