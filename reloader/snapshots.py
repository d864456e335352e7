"""What the controller keeps of each watched object: the transforms handed to the informers.

A raw object is reduced to a snapshot the moment it is decoded, before it reaches any store, so the
cache is small and holds no config values:

- ConfigMap/Secret → ``ConfigSnapshot``: identity, the two flags that matter (``match``,
  ``ignore``) and one keyed digest per data key. Never ``data``, never ``managedFields``.
- Workload → ``WorkloadSnapshot``: identity, the configs its pod spec references (when it opts in at
  all), its parsed ``Policy`` and any annotation problems, the digests recorded on it and the time
  of its last restart. Snapshots compare equal when nothing the controller acts on changed, which is
  how the index knows a workload update needs no second look.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from reloader.annotations import AnnotationNames, Policy, Problem, parse_policy
from reloader.digests import DigestKey, KeyDigests, Recorded, decode_record, key_digests
from reloader.model import (
    LAST_RELOADED_FROM,
    RECORD_ANNOTATION,
    ConfigKey,
    ConfigKind,
    ConfigRef,
    RawObject,
    WorkloadKey,
    WorkloadKind,
    pod_template,
)
from reloader.references import find_references


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """Kept per cached ConfigMap/Secret, so every byte counts: identity fields are stored flat
    (no nested key object) and repeated strings (namespaces, data key names) are interned."""

    kind: ConfigKind
    namespace: str
    name: str
    digests: KeyDigests
    match: bool
    ignore: bool

    @property
    def key(self) -> ConfigKey:
        return ConfigKey(self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class WorkloadSnapshot:
    key: WorkloadKey
    references: frozenset[ConfigRef]
    policy: Policy
    problems: tuple[Problem, ...]
    recorded: Recorded | None
    last_restart_at: float | None
    containers: tuple[str, ...]
    paused: bool = False
    paused_at: float | None = None
    resource_version: str = field(compare=False, default="")
    uid: str = field(compare=False, default="")

    @property
    def first_container(self) -> str | None:
        return self.containers[0] if self.containers else None

    def reference_to(self, kind: ConfigKind, name: str) -> ConfigRef | None:
        for ref in self.references:
            if ref.kind == kind and ref.name == name:
                return ref
        return None


@dataclass(frozen=True, slots=True)
class SnapshotContext:
    """What the transforms need besides the object; built once by the app from the settings."""

    digest_key: DigestKey
    names: AnnotationNames
    auto_reload_all: bool


def _annotations(obj: Mapping[str, object]) -> Mapping[str, str]:
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            return annotations
    return {}


def config_snapshot(
    kind: ConfigKind, obj: RawObject, *, context: SnapshotContext
) -> ConfigSnapshot:
    """Reduce a ConfigMap or Secret to digests and flags; its values go no further than here."""
    metadata = obj.get("metadata", {})
    annotations = _annotations(obj)
    return ConfigSnapshot(
        kind=kind,
        namespace=sys.intern(metadata.get("namespace", "")),
        name=metadata.get("name", ""),
        digests=key_digests(obj.get("data"), obj.get("binaryData"), key=context.digest_key),
        match=annotations.get(context.names.match) == "true",
        ignore=annotations.get(context.names.ignore) == "true",
    )


def _restart_time(template_annotations: Mapping[str, str]) -> float | None:
    marker = template_annotations.get(LAST_RELOADED_FROM)
    if not marker:
        return None
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError):
        observed = orjson.loads(marker).get("observedAt")
        if isinstance(observed, int | float):
            return float(observed)
    return None


def _last_restart(recorded: Recorded | None, template: Mapping[str, str]) -> float | None:
    """From our record; else from a Stakater-style marker (a workload Stakater restarted)."""
    if recorded is not None and recorded.restarted_at is not None:
        return float(recorded.restarted_at)
    return _restart_time(template)


def _container_names(pod_spec: object) -> tuple[str, ...]:
    containers = pod_spec.get("containers") if isinstance(pod_spec, dict) else None
    if not isinstance(containers, list):
        return ()
    return tuple(
        c["name"] for c in containers if isinstance(c, dict) and isinstance(c.get("name"), str)
    )


def _rfc3339(value: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 time such as ``2026-01-02T03:04:05Z``."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def workload_snapshot(
    kind: WorkloadKind, obj: RawObject, *, context: SnapshotContext
) -> WorkloadSnapshot:
    """Reduce a workload to what the decision needs; references only when it opts in."""
    metadata = obj.get("metadata", {})
    recorded = decode_record(_annotations(obj).get(RECORD_ANNOTATION))
    template = pod_template(obj, kind)
    template_annotations = _annotations(template)
    policy, problems = parse_policy(
        metadata.get("annotations"),
        template_annotations,
        names=context.names,
        auto_reload_all=context.auto_reload_all,
    )
    pod_spec = template.get("spec") if isinstance(template.get("spec"), dict) else {}
    spec = obj.get("spec")
    return WorkloadSnapshot(
        key=WorkloadKey(kind.name, metadata.get("namespace", ""), metadata.get("name", "")),
        references=find_references(pod_spec or {}) if policy.opted_in else frozenset(),
        policy=policy,
        problems=problems,
        recorded=recorded,
        last_restart_at=_last_restart(recorded, template_annotations),
        containers=_container_names(pod_spec),
        paused=isinstance(spec, dict) and spec.get("paused") is True,
        paused_at=_rfc3339(_annotations(obj).get(context.names.paused_at)),
        resource_version=metadata.get("resourceVersion", ""),
        uid=metadata.get("uid", ""),
    )
