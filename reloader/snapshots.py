"""What the controller keeps of each watched object: the transforms handed to the informers.

A raw object is reduced to a snapshot the moment it is decoded, before it reaches any store, so the
cache is small and holds no config values:

- ConfigMap/Secret → ``ConfigSnapshot``: identity, the two flags that matter (``match``,
  ``ignore``) and one keyed digest per data key. Never ``data``, never ``managedFields``.
- Workload → ``WorkloadSnapshot``: identity, the configs its pod spec references (when it opts in at
  all), its parsed ``Policy`` and any annotation problems, the digests recorded on it and the time
  of its last restart. Snapshots compare equal when nothing the controller acts on changed, which is
  how the index knows a workload update needs no second look.

The record found on a workload is checked against the object here (``bind_record``): a record of an
older format, or one that names another object (``metadata.uid``: the workload was deleted and
re-created, e.g. ``helm upgrade --force``, Argo CD ``Replace=true``), another pod template (it was
edited since: its pods are rolling anyway and read the configs as they are now), or that predates
the template's last restart marker (an old record put back by a GitOps self-heal) is set aside, and
the decision re-records without restarting.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

import orjson

from reloader.annotations import AnnotationNames, Policy, Problem, parse_policy
from reloader.digests import (
    RECORD_VERSION,
    DigestKey,
    KeyDigests,
    Recorded,
    decode_record,
    key_digests,
)
from reloader.model import (
    LAST_RELOADED_FROM,
    RECORD_ANNOTATION,
    UNREAD_ANNOTATIONS,
    ConfigKey,
    ConfigKind,
    ConfigRef,
    RawObject,
    WorkloadKey,
    WorkloadKind,
    pod_template,
)
from reloader.references import (
    PackedReferences,
    find_references,
    pack_references,
    unpack_references,
)

_OUR_ENV = re.compile(r"STAKATER_.+_(CONFIGMAP|SECRET|SECRETPROVIDERCLASS)")
"""Env vars the env-vars strategy sets (ours or Stakater's): a restart, not a template edit."""
_GENERATED_LABELS = frozenset(
    {
        "controller-uid",
        "job-name",
        "batch.kubernetes.io/controller-uid",
        "batch.kubernetes.io/job-name",
    }
)
"""Labels the Job controller puts on a Job's pod template: they change when a Job is re-created."""


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


PackedConfig = bytes
"""What a config informer's store keeps (a ``table.PackedTable`` value): one byte of flags
(``match``, ``ignore``), then the digests. Kind, namespace and name are the informer's and the
store's keys."""
_MATCH, _IGNORE = 1, 2


def pack_config(snapshot: ConfigSnapshot) -> PackedConfig:
    flags = (_MATCH if snapshot.match else 0) | (_IGNORE if snapshot.ignore else 0)
    return bytes((flags,)) + snapshot.digests


def unpacker(kind: ConfigKind) -> Callable[[str, str, bytes], ConfigSnapshot]:
    """Rebuild a config's snapshot from its store keys and ``pack_config``'s value."""

    def unpack(namespace: str, name: str, packed: bytes) -> ConfigSnapshot:
        flags = packed[0]
        return ConfigSnapshot(
            kind, namespace, name, packed[1:], bool(flags & _MATCH), bool(flags & _IGNORE)
        )

    return unpack


@dataclass(frozen=True, slots=True)
class WorkloadSnapshot:
    key: WorkloadKey
    packed_references: PackedReferences
    """``references``, packed: kept per cached workload, read only when it is decided on or
    re-indexed."""
    policy: Policy
    problems: tuple[Problem, ...]
    recorded: Recorded | None
    last_restart_at: float | None
    containers: tuple[str, ...]
    paused: bool = False
    paused_at: float | None = None
    resource_version: str = field(compare=False, default="")
    uid: str = field(compare=False, default="")
    fingerprint: bytes = field(compare=False, default=b"")
    """``workload_fingerprint`` of the object this was made from (``refreshed_workload``)."""

    @property
    def references(self) -> tuple[ConfigRef, ...]:
        """One per (kind, name), sorted (``references.find_references``); built on each call."""
        return unpack_references(self.packed_references)

    @property
    def first_container(self) -> str | None:
        return self.containers[0] if self.containers else None


@dataclass(frozen=True, slots=True)
class SnapshotContext:
    """What the transforms need besides the object; built once by the app from the settings."""

    digest_key: DigestKey
    names: AnnotationNames
    auto_reload_all: bool
    csi: bool = False
    """``--enable-csi-integration``: CSI volumes reference their SecretProviderClass."""


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
        digests=key_digests(
            obj.get("data"),
            obj.get("binaryData"),
            key=context.digest_key,
            config=ConfigKey(kind, metadata.get("namespace", ""), metadata.get("name", "")),
        ),
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
    return tuple(  # interned: the same few names ("app") recur in every cached workload
        sys.intern(c["name"])
        for c in containers
        if isinstance(c, dict) and isinstance(c.get("name"), str)
    )


def _rfc3339(value: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 time such as ``2026-01-02T03:04:05Z``."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _ours(env_var: object) -> bool:
    return isinstance(env_var, dict) and _OUR_ENV.fullmatch(str(env_var.get("name"))) is not None


def _without_our_env(container: object) -> object:
    if not isinstance(container, dict) or not isinstance(container.get("env"), list):
        return container
    env = [
        e
        for e in container["env"]
        if not (isinstance(e, dict) and _OUR_ENV.fullmatch(str(e.get("name"))))
    ]
    trimmed = {k: v for k, v in container.items() if k != "env"}
    return {**trimmed, "env": env} if env else trimmed


def _without(mapping: object, drop: Callable[[str], bool]) -> dict[str, object]:
    return {k: v for k, v in mapping.items() if not drop(k)} if isinstance(mapping, dict) else {}


def _mapping(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def template_hash(template: Mapping[str, object]) -> str:
    """A hash of a pod template as the user wrote it: what our restarts write is left out (the
    restart marker, the env-vars strategy's variables) and so are the Job controller's labels.

    When it differs from the one in the record, the template was edited since the record was made:
    the pods roll from that edit and read the configs as they are, so the record is made again
    rather than compared (a key-set edit such as keyRef → envFrom is such an edit)."""
    metadata = _mapping(template.get("metadata"))
    annotations = _without(metadata.get("annotations"), lambda k: k == LAST_RELOADED_FROM)
    labels = _without(metadata.get("labels"), lambda k: k in _GENERATED_LABELS)
    trimmed_meta = _without(metadata, lambda k: k in ("annotations", "labels"))
    spec = _mapping(template.get("spec"))
    containers = spec.get("containers")
    if isinstance(containers, list):
        spec = {**spec, "containers": [_without_our_env(c) for c in containers]}
    body = {"metadata": trimmed_meta, "annotations": annotations, "labels": labels, "spec": spec}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _stale(found: Recorded, marker_time: float | None) -> bool:
    """Whether the record predates the last restart marker on the template: every restart writes
    its time into both, so an older record was put back (a GitOps self-heal, a re-applied dump)."""
    if marker_time is None:
        return False
    return found.restarted_at is None or found.restarted_at < int(marker_time)


def _set_aside(
    found: Recorded, *, uid: str, template: str, marker_time: float | None
) -> str | None:
    """Why the record found on a workload does not describe its pods, or None if it does."""
    if found.version != RECORD_VERSION:
        return "format"
    if uid and found.uid and found.uid != uid:
        return "uid"
    if found.template != template:
        return "template"
    if _stale(found, marker_time):
        return "stale"
    return None


def bind_record(
    found: Recorded | None,
    *,
    uid: str,
    template: str,
    marker_time: float | None,
    opted_in: bool,
) -> Recorded | None:
    """The record found on a workload if it belongs to it, else ``Recorded.nothing`` with why.

    Not opted in and nothing found: ``None`` (nothing to keep per unrelated workload). An empty
    ``uid`` (a Job: the controller re-creates it, so its record cannot name the new uid) binds to
    the template only. ``marker_time`` is the restart marker's ``observedAt``: a new record starts
    from it, so a workload restarted by Stakater keeps its minimum interval and is not stale."""
    reset = None
    if found is not None:
        reset = _set_aside(found, uid=uid, template=template, marker_time=marker_time)
        if reset is None:
            return replace(found, uid=uid)
    elif not opted_in:
        return None
    restarted_at = int(marker_time) if marker_time is not None else None
    return Recorded.nothing(uid=uid, template=template, restarted_at=restarted_at, reset=reset)


def workload_snapshot(
    kind: WorkloadKind, obj: RawObject, *, context: SnapshotContext
) -> WorkloadSnapshot:
    """Reduce a workload to what the decision needs; references only when it opts in."""
    metadata = obj.get("metadata", {})
    template = pod_template(obj, kind)
    template_annotations = _annotations(template)
    policy, problems = parse_policy(
        metadata.get("annotations"),
        template_annotations,
        names=context.names,
        auto_reload_all=context.auto_reload_all,
    )
    found = decode_record(_annotations(obj).get(RECORD_ANNOTATION))
    recorded = (
        bind_record(
            found,
            uid="" if kind.restart == "recreate" else metadata.get("uid", ""),
            template=template_hash(template),
            marker_time=_restart_time(template_annotations),
            opted_in=policy.opted_in,
        )
        if found is not None or policy.opted_in
        else None  # most workloads: no hash of their template on every status update
    )
    pod_spec = template.get("spec") if isinstance(template.get("spec"), dict) else {}
    spec = obj.get("spec")
    return WorkloadSnapshot(
        key=WorkloadKey(
            kind.name, sys.intern(metadata.get("namespace", "")), metadata.get("name", "")
        ),
        packed_references=(
            pack_references(find_references(pod_spec or {}, csi=context.csi))
            if policy.opted_in
            else b""
        ),
        policy=policy,
        problems=problems,
        recorded=recorded,
        last_restart_at=_last_restart(recorded, template_annotations),
        containers=_container_names(pod_spec),
        paused=isinstance(spec, dict) and spec.get("paused") is True,
        paused_at=_rfc3339(_annotations(obj).get(context.names.paused_at)),
        resource_version=metadata.get("resourceVersion", ""),
        uid=metadata.get("uid", ""),
        fingerprint=workload_fingerprint(obj),
    )


def workload_fingerprint(obj: RawObject) -> bytes:
    """16 bytes that change whenever anything a snapshot is made of may have: the object's
    ``generation`` (the server raises it on every change to ``spec``, the pod template included)
    and its annotations but ``UNREAD_ANNOTATIONS``. Empty when the object has no generation: then
    nothing is assumed."""
    metadata = obj.get("metadata", {})
    generation = metadata.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool):
        return b""
    annotations = metadata.get("annotations") or {}
    if isinstance(annotations, dict) and not UNREAD_ANNOTATIONS.isdisjoint(annotations):
        annotations = {k: v for k, v in annotations.items() if k not in UNREAD_ANNOTATIONS}
    try:
        source = orjson.dumps([generation, annotations], option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # a generation past 64 bits
        return b""
    return hashlib.blake2b(source, digest_size=16).digest()


def refreshed_workload(old: WorkloadSnapshot, obj: RawObject) -> WorkloadSnapshot | None:
    """``old`` with the object's resourceVersion, when the object changed in nothing a snapshot is
    made of (same uid, generation and annotations: a status update, a label); else None, and the
    object is read whole. Status updates are most of a workload's events (each pod that starts or
    stops updates its Deployment's), and reading one whole (the pod template hashed, references
    found, annotations parsed) was a quarter of the controller's CPU in a burst of restarts."""
    metadata = obj.get("metadata", {})
    if not old.fingerprint or metadata.get("uid", "") != old.uid:
        return None
    if workload_fingerprint(obj) != old.fingerprint:
        return None
    version = metadata.get("resourceVersion", "")
    return old if version == old.resource_version else replace(old, resource_version=version)
