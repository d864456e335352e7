"""The reference index: dependents both ways, shared configs, re-indexing and patterns."""

from __future__ import annotations

from typing import Any

from reloader.index import PACKED_DEPENDENTS, ReferenceIndex
from reloader.model import KINDS, ConfigKey, RawObject, WorkloadKey
from reloader.snapshots import (
    ConfigSnapshot,
    WorkloadSnapshot,
    config_snapshot,
    workload_snapshot,
)
from tests.test_snapshots import CONTEXT

AUTO = {"reloader.stakater.com/auto": "true"}


def workload(
    name: str, *configs: str, annotations: dict[str, str] | None = None
) -> WorkloadSnapshot:
    env_from = [{"configMapRef": {"name": config}} for config in configs]
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations or AUTO},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "envFrom": env_from}]}}},
    }
    return workload_snapshot(KINDS["Deployment"], RawObject(**body), context=CONTEXT)  # type: ignore[typeddict-item]


def cm(name: str, namespace: str = "ns") -> ConfigKey:
    return ConfigKey("ConfigMap", namespace, name)


def key(name: str) -> WorkloadKey:
    return WorkloadKey("Deployment", "ns", name)


def config(name: str, namespace: str = "ns") -> ConfigSnapshot:
    body: dict[str, Any] = {"metadata": {"name": name, "namespace": namespace}, "data": {}}
    return config_snapshot("ConfigMap", RawObject(**body), context=CONTEXT)  # type: ignore[typeddict-item]


def changed(index: ReferenceIndex, name: str, namespace: str = "ns") -> frozenset[WorkloadKey]:
    return index.config_changed(None, config(name, namespace))


def test_a_config_shared_by_two_workloads_finds_both_until_one_leaves() -> None:
    index = ReferenceIndex()
    a, b = workload("a", "shared", "own-a"), workload("b", "shared")
    index.workload_changed(None, a)
    index.workload_changed(None, b)

    assert changed(index, "shared") == {key("a"), key("b")}
    assert changed(index, "own-a") == {key("a")}
    assert changed(index, "shared", namespace="other") == frozenset()

    index.workload_changed(b, None)
    assert changed(index, "shared") == {key("a")}
    index.workload_changed(a, None)
    assert changed(index, "shared") == frozenset()
    assert index.statistics().configs == 0 and index.statistics().workloads == 0


def test_re_indexing_drops_the_references_the_workload_no_longer_has() -> None:
    index = ReferenceIndex()
    before, after = workload("a", "old", "kept"), workload("a", "kept", "new")
    index.workload_changed(None, before)
    index.workload_changed(before, after)

    assert changed(index, "old") == frozenset()
    assert changed(index, "kept") == changed(index, "new") == {key("a")}
    assert index.dependencies(key("a")) == {cm("kept"), cm("new")}
    assert index.statistics().configs == 2


def test_a_workload_that_opts_out_is_looked_at_once_and_then_unindexed() -> None:
    index = ReferenceIndex()
    opted_in = workload("a", "cfg")
    opted_out = workload("a", "cfg", annotations={"other": "x"})
    index.workload_changed(None, opted_in)

    assert index.workload_changed(opted_in, opted_out) == {key("a")}, "its last look"
    assert changed(index, "cfg") == frozenset()
    assert index.workload_changed(opted_out, opted_out) == frozenset()


def test_a_named_list_by_exact_name_and_by_pattern() -> None:
    index = ReferenceIndex()
    named = workload("named", annotations={"configmap.reloader.stakater.com/reload": "listed"})
    pattern = workload("pattern", annotations={"configmap.reloader.stakater.com/reload": "app-.*"})
    index.workload_changed(None, named)
    index.workload_changed(None, pattern)

    assert changed(index, "listed") == {key("named")}
    assert changed(index, "app-one") == {key("pattern")}
    assert changed(index, "unrelated") == frozenset()
    assert index.statistics().pattern_workloads == 1

    index.workload_changed(pattern, None)
    assert changed(index, "app-one") == frozenset()


def test_the_same_config_referenced_and_listed_is_one_dependency() -> None:
    index = ReferenceIndex()
    both = workload(
        "a", "cfg", annotations={**AUTO, "configmap.reloader.stakater.com/reload": "cfg"}
    )
    index.workload_changed(None, both)
    assert index.dependents(cm("cfg")) == {key("a")}
    index.workload_changed(both, None)
    assert index.dependents(cm("cfg")) == frozenset()


def test_a_config_shared_by_many_workloads_keeps_every_dependent() -> None:
    """Past ``PACKED_DEPENDENTS`` a config's dependents move to a set: each one is found, and
    taking them away one by one leaves exactly the others, then nothing at all."""
    index = ReferenceIndex()
    count = PACKED_DEPENDENTS * 3
    snapshots = [workload(f"app-{n}", "shared", f"own-{n}") for n in range(count)]
    for snapshot in snapshots:
        index.workload_changed(None, snapshot)
    assert index.dependents(cm("shared")) == {key(f"app-{n}") for n in range(count)}
    assert index.dependents(cm("own-5")) == {key("app-5")}
    for n, snapshot in enumerate(snapshots):
        index.workload_changed(snapshot, None)
        assert index.dependents(cm("shared")) == {key(f"app-{m}") for m in range(n + 1, count)}
        assert index.dependents(cm(f"own-{n}")) == frozenset()
    assert index._dependents == {} and index._crowded == {}
    assert index.statistics().configs == 0
