"""``reloader explain KIND/NAME -n NAMESPACE``: why a workload will, or will not, reload.

The answer comes from the controller's own code, run once on what the API server holds now: the
workload through ``snapshots.workload_snapshot`` (so ``annotations.parse_policy`` and
``references.find_references``), the namespace's ConfigMaps and Secrets through
``snapshots.config_snapshot``, then ``decide.dependencies`` and ``decide.decide`` under the digest
key the controller uses. Whatever differs between this command and the controller is a bug here.
Only *where* a config is referenced from (container, env/envFrom/volume/projected) is extra:
``reference_uses`` walks the pod spec for display, and ``find_references`` stays the source of
truth for the decision (tests check that the two agree).

Guarantees:

- Read-only: it gets the workload, lists ConfigMaps, Secrets and the workload's Events in its
  namespace, gets the digest-key Secret and, with ``--namespace-selector``, lists namespaces.
- Secret values never leave ``config_snapshot``: a listed Secret is reduced to digests at once, and
  only names, data key names and digests (as recorded on the workload anyway) are printed.
- Exit codes: 0 the workload reloads when a watched config changes; 1 it does not (the reasons are
  printed); 2 the question could not be answered (bad arguments, not found, no access).
- ``--output json`` prints one object whose keys are documented in ``docs/troubleshooting.md`` and
  only ever added to.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from reloader.annotations import AnnotationNames, KindRules
from reloader.app import StartupError, key_from_file, key_from_secret
from reloader.decide import Decision, Dependency, config_id, decide, dependencies
from reloader.digests import DigestKey
from reloader.kube import Api, ApiError, ApiNotFound, connect
from reloader.model import (
    CONFIG_KINDS,
    CONFIG_RESOURCES,
    EVENTS,
    KINDS,
    LAST_RELOADED_FROM,
    NAMESPACES,
    SECRETS,
    ConfigKind,
    RawObject,
    WorkloadKind,
    WorkloadKindName,
    pod_template,
)
from reloader.settings import Settings, build_parser
from reloader.snapshots import (
    ConfigSnapshot,
    SnapshotContext,
    WorkloadSnapshot,
    config_snapshot,
    workload_snapshot,
)

EXIT_RELOADS, EXIT_DOES_NOT_RELOAD, EXIT_ERROR = 0, 1, 2
_SHORT_NAMES: dict[str, WorkloadKindName] = {
    "deploy": "Deployment",
    "sts": "StatefulSet",
    "ds": "DaemonSet",
    "cj": "CronJob",
    "ro": "Rollout",
}
KIND_NAMES: dict[str, WorkloadKindName] = {
    **{name.lower(): name for name in KINDS},
    **{kind.resource.plural: name for name, kind in KINDS.items()},
    **_SHORT_NAMES,
}
"""Every spelling of a workload kind accepted on the command line, lower-case (as kubectl's)."""
_PAGE = "500"
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
"""What Go's ``strconv.ParseBool`` reads as true: which auto key enabled a kind, for display."""

Via = Literal["env", "envFrom", "volume", "projected"]
Status = Literal["watched", "excluded", "ignored", "not-selected", "not-wanted"]


class ExplainError(Exception):
    """The question cannot be answered (exit 2); the message says why, in one line."""


# --- where a pod spec references configs (display only) ---------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Use:
    """One place a pod spec reads a config. ``container`` is None for a volume nobody mounts;
    ``keys`` None means the whole object."""

    kind: ConfigKind
    name: str
    via: Via
    container: str | None
    volume: str | None = None
    keys: tuple[str, ...] | None = None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _dicts(value: object) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, Mapping))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _item_keys(source: Mapping[str, Any]) -> tuple[str, ...] | None:
    keys = sorted({k for item in _dicts(source.get("items")) if (k := _text(item.get("key")))})
    return tuple(keys) or None


def _env_uses(container: Mapping[str, Any]) -> Iterator[Use]:
    name = _text(container.get("name"))
    for env in _dicts(container.get("env")):
        value_from = _mapping(env.get("valueFrom"))
        for ref_field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            ref = value_from.get(ref_field)
            if isinstance(ref, Mapping) and (config := _text(ref.get("name"))):
                key = _text(ref.get("key"))
                yield Use(kind, config, "env", name, keys=(key,) if key else None)  # type: ignore[arg-type]
    for env_from in _dicts(container.get("envFrom")):
        for ref_field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            ref = env_from.get(ref_field)
            if isinstance(ref, Mapping) and (config := _text(ref.get("name"))):
                yield Use(kind, config, "envFrom", name)  # type: ignore[arg-type]


def _volume_sources(volume: Mapping[str, Any]) -> Iterator[tuple[ConfigKind, str, Via, Any]]:
    for source_field, kind, name_field in (
        ("configMap", "ConfigMap", "name"),
        ("secret", "Secret", "secretName"),
    ):
        source = volume.get(source_field)
        if isinstance(source, Mapping) and (name := _text(source.get(name_field))):
            yield kind, name, "volume", source  # type: ignore[misc]
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, Mapping) else None
    for entry in _dicts(sources):
        for source_field, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
            source = entry.get(source_field)
            if isinstance(source, Mapping) and (name := _text(source.get("name"))):
                yield kind, name, "projected", source  # type: ignore[misc]


def reference_uses(pod_spec: Mapping[str, Any]) -> tuple[Use, ...]:
    """Every use of a config in a pod spec, one per (config, container, route), sorted."""
    containers = [*_dicts(pod_spec.get("containers")), *_dicts(pod_spec.get("initContainers"))]
    uses = {use for container in containers for use in _env_uses(container)}
    mounted_by: dict[str, set[str]] = {}
    for container in containers:
        for mount in _dicts(container.get("volumeMounts")):
            if (mounted := _text(mount.get("name"))) and (name := _text(container.get("name"))):
                mounted_by.setdefault(mounted, set()).add(name)
    for volume in _dicts(pod_spec.get("volumes")):
        volume_name = _text(volume.get("name"))
        users: list[str | None] = [*sorted(mounted_by.get(volume_name or "", ()))] or [None]
        for kind, name, via, source in _volume_sources(volume):
            keys = _item_keys(source)
            uses.update(Use(kind, name, via, user, volume_name, keys) for user in users)
    return tuple(sorted(uses, key=lambda u: (u.kind, u.name, u.via, u.container or "")))


# --- what was read from the server ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    kind: WorkloadKind
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything read from the server, Secrets already reduced to digests."""

    target: Target
    workload: RawObject
    configs: Mapping[ConfigKind, Mapping[str, ConfigSnapshot]]
    """Every ConfigMap and Secret of the namespace, whatever the selector."""
    selected: Mapping[ConfigKind, frozenset[str]] | None
    """With ``--resource-label-selector``: the names the selector matches (what the controller
    caches); None without one."""
    key: DigestKey | None
    key_note: str
    events: tuple[RawObject, ...]
    notes: tuple[str, ...] = ()
    """What could not be read (Events, the namespace's labels) and so is not part of the answer."""
    namespace_selected: bool | None = None


async def _list(api: Api, path: str, params: Sequence[tuple[str, str]] = ()) -> list[RawObject]:
    items: list[RawObject] = []
    token = ""
    while True:
        page_params = [*params, ("limit", _PAGE), *([("continue", token)] if token else [])]
        page = await api.list_page(path, params=page_params)
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:
            return items


async def read_digest_key(api: Api, settings: Settings) -> tuple[DigestKey | None, str]:
    """The controller's digest key, resolved as ``app.load_digest_key`` does but never created:
    the setting, else the key file, else the key Secret. ``None`` and why when it cannot be read."""
    if settings.hash_key is not None:
        key = DigestKey.from_secret(settings.hash_key.get_secret_value().encode())
        return key, "from RELOADER_HASH_KEY / --hash-key"
    if settings.hash_key_file is not None:
        try:
            return key_from_file(settings.hash_key_file), f"from the file {settings.hash_key_file}"
        except StartupError as error:
            return None, str(error)
    namespace, name = settings.controller_namespace, settings.hash_key_secret
    where = f"Secret {namespace}/{name}"
    try:
        secret = await api.get(SECRETS.object_path(namespace, name))
        return key_from_secret(secret, namespace, name), f"from {where}"
    except ApiError as error:  # unreadable, or no usable key in it
        return None, f"cannot read the digest key {where}: {error}"


async def _configs(
    api: Api, namespace: str, context: SnapshotContext, selector: str | None
) -> tuple[dict[ConfigKind, dict[str, ConfigSnapshot]], dict[ConfigKind, frozenset[str]] | None]:
    configs: dict[ConfigKind, dict[str, ConfigSnapshot]] = {}
    selected: dict[ConfigKind, frozenset[str]] = {}
    for kind in CONFIG_KINDS:
        path = CONFIG_RESOURCES[kind].collection_path(namespace)
        snapshots = (config_snapshot(kind, obj, context=context) for obj in await _list(api, path))
        configs[kind] = {snapshot.name: snapshot for snapshot in snapshots}
        if selector:
            matching = await _list(api, path, [("labelSelector", selector)])
            selected[kind] = frozenset(o.get("metadata", {}).get("name", "") for o in matching)
    return configs, (selected if selector else None)


async def _events(api: Api, target: Target) -> tuple[tuple[RawObject, ...], str | None]:
    fields = f"involvedObject.kind={target.kind.name},involvedObject.name={target.name}"
    try:
        path = EVENTS.collection_path(target.namespace)
        found = await _list(api, path, [("fieldSelector", fields)])
    except ApiError as error:
        return (), f"cannot list Events: {error}"
    return tuple(found), None


async def _namespace_selected(
    api: Api, namespace: str, settings: Settings
) -> tuple[bool | None, str | None]:
    selector = settings.namespace_label_selector
    if selector is None or not settings.cluster_wide:
        return None, None
    params = [("labelSelector", selector), ("fieldSelector", f"metadata.name={namespace}")]
    try:
        return bool(await _list(api, NAMESPACES.collection_path(None), params)), None
    except ApiError as error:
        return None, f"cannot check --namespace-selector (list namespaces): {error}"


async def gather(api: Api, target: Target, settings: Settings) -> Facts:
    """Read what the answer needs; ``ExplainError`` when the workload or configs cannot be read."""
    path = target.kind.resource.object_path(target.namespace, target.name)
    what = f"{target.kind.name} {target.namespace}/{target.name}"
    try:
        workload = await api.get(path)
    except ApiNotFound as error:
        hint = " (is the Argo Rollouts CRD installed?)" if target.kind.optional else ""
        raise ExplainError(f"{what} not found{hint}: {error.message}") from error
    except ApiError as error:
        raise ExplainError(f"cannot get {what}: {error}") from error
    key, key_note = await read_digest_key(api, settings)
    context = _context(settings, key or DigestKey.from_secret(DigestKey.generate_secret()))
    try:
        configs, selected = await _configs(
            api, target.namespace, context, settings.config_label_selector
        )
    except ApiError as error:
        where = target.namespace
        raise ExplainError(f"cannot list ConfigMaps/Secrets in {where}: {error}") from error
    events, events_note = await _events(api, target)
    in_selection, selection_note = await _namespace_selected(api, target.namespace, settings)
    notes = tuple(note for note in (events_note, selection_note) if note)
    return Facts(target, workload, configs, selected, key, key_note, events, notes, in_selection)


def _context(settings: Settings, key: DigestKey) -> SnapshotContext:
    return SnapshotContext(
        digest_key=key, names=settings.annotation_names(), auto_reload_all=settings.auto_reload_all
    )


# --- the answer, from the facts (pure) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """How reloading on one config kind was enabled: the keys the policy was read from."""

    kind: ConfigKind
    source: Literal["metadata", "pod template"]
    """Where the named list, search and auto keys were read (metadata wins when any is there)."""
    annotations: Mapping[str, str]
    """The enabling annotations present on ``source``, with their values."""
    auto_reload_all: bool
    """Enabled by ``--auto-reload-all`` alone."""
    excluded: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConfigVerdict:
    """One config the workload references or names, and what the controller does with it."""

    kind: ConfigKind
    name: str
    exists: bool
    status: Status
    reason: str
    uses: tuple[Use, ...]
    recorded: str | None = None
    """The digest recorded on the workload (``""``: recorded as missing); None: nothing usable."""
    current: str | None = None
    changed: bool = False


@dataclass(frozen=True, slots=True)
class Explanation:
    target: Target
    will_reload: bool
    reasons: tuple[str, ...]
    """Why it will not reload; empty when it will."""
    reload_now: bool | None
    """Whether the controller would restart it on its next look; None without the digest key."""
    reload_now_reason: str
    key_id: str | None
    key_note: str
    record: str
    policies: tuple[KindPolicy, ...]
    configs: tuple[ConfigVerdict, ...]
    problems: tuple[dict[str, str], ...]
    last_reload: dict[str, Any] | None
    events: tuple[dict[str, str], ...]
    notes: tuple[str, ...] = field(default=())


def _kind_keys(kind: ConfigKind, names: AnnotationNames) -> tuple[str, str, str]:
    """(named list, typed auto, exclude list) keys of one kind."""
    if kind == "ConfigMap":
        return names.configmap_reload, names.configmap_auto, names.configmaps_exclude
    return names.secret_reload, names.secret_auto, names.secrets_exclude


def _strings(annotations: object) -> dict[str, str]:
    if not isinstance(annotations, Mapping):
        return {}
    return {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    metadata = obj.get("metadata")
    return _strings(metadata.get("annotations")) if isinstance(metadata, Mapping) else {}


def kind_policy(
    kind: ConfigKind, facts: Facts, rules: KindRules, names: AnnotationNames, auto_all: bool
) -> KindPolicy:
    """Where ``parse_policy`` read this kind's keys (the same metadata-or-template switch)."""
    reload_key, typed_auto, _ = _kind_keys(kind, names)
    meta = _annotations(facts.workload)
    template = _annotations(pod_template(facts.workload, facts.target.kind))
    switches = (reload_key, names.search, names.auto, typed_auto)
    from_meta = any(key in meta for key in switches)
    source = meta if from_meta else template
    present = {key: source[key] for key in switches if key in source}
    unset = not source.get(names.auto) and not source.get(typed_auto)
    return KindPolicy(
        kind=kind,
        source="metadata" if from_meta else "pod template",
        annotations=present,
        auto_reload_all=auto_all and unset and rules.auto,
        excluded=tuple(sorted(rules.excluded)),
    )


def _visible(facts: Facts, settings: Settings) -> dict[ConfigKind, dict[str, ConfigSnapshot]]:
    """The configs the controller's cache holds for this namespace: watched kinds, selected."""
    return {
        kind: {
            name: snapshot
            for name, snapshot in facts.configs[kind].items()
            if facts.selected is None or name in facts.selected[kind]
        }
        for kind in CONFIG_KINDS
        if settings.watches_config(kind)
    }


def _why_wanted(rules: KindRules, policy: KindPolicy, name: str, names: AnnotationNames) -> str:
    reload_key, typed_auto, _ = _kind_keys(policy.kind, names)
    if rules.named(name):
        return f"named in {reload_key} (on the {policy.source})"
    if policy.auto_reload_all:
        return "--auto-reload-all (no auto annotation on the workload)"
    for key in (names.auto, typed_auto):
        if policy.annotations.get(key) in _GO_TRUE:
            return f"{key}={policy.annotations[key]!r} (on the {policy.source})"
    return f"{names.search}=true (on the {policy.source}) and the {policy.kind} has {names.match}"


def _why_not_wanted(
    rules: KindRules, policy: KindPolicy, *, match: bool, referenced: bool, names: AnnotationNames
) -> str:
    reload_key, typed_auto, _ = _kind_keys(policy.kind, names)
    if not rules.active:
        return (
            f"no annotation enables reloading on {policy.kind}s (set {names.auto}, {typed_auto}, "
            f"{reload_key} or {names.search})"
        )
    why = []
    if rules.names or rules.patterns:
        why.append(f"not named in {reload_key}")
    if rules.search and not match:
        why.append(f'{names.search}=true but the {policy.kind} lacks {names.match}="true"')
    if not referenced:
        why.append("the pod spec does not reference it")
    return "; ".join(why) or "not wanted by the workload's annotations"


@dataclass(frozen=True, slots=True)
class _Computed:
    """What ``explain`` computed once with the controller's functions; each config's line reads
    it."""

    facts: Facts
    settings: Settings
    names: AnnotationNames
    snapshot: WorkloadSnapshot
    deps: Mapping[str, Dependency]
    decision: Decision | None
    policies: Mapping[ConfigKind, KindPolicy]
    uses: tuple[Use, ...]

    @property
    def comparable(self) -> bool:
        """Whether the record on the workload can be compared with digests under our key."""
        recorded, key = self.snapshot.recorded, self.facts.key
        if self.decision is None or recorded is None or key is None:
            return False
        return recorded.usable and recorded.key_id == key.key_id


def _status(c: _Computed, kind: ConfigKind, name: str, *, referenced: bool) -> tuple[Status, str]:
    """The first reason, in the controller's order, why a config does or does not count."""
    config, dep = c.facts.configs[kind].get(name), c.deps.get(config_id(kind, name))
    rules, policy = c.snapshot.policy.rules(kind), c.policies[kind]
    if not c.settings.watches_config(kind):
        return "ignored", f"--resources-to-ignore={kind.lower()}s: {kind}s are not watched"
    if config is not None and c.facts.selected is not None and name not in c.facts.selected[kind]:
        selector = c.settings.config_label_selector
        return "not-selected", f"does not match --resource-label-selector ({selector})"
    if config is not None and config.ignore:
        return "ignored", f'the {kind} carries {c.names.ignore}="true"'
    if name in rules.excluded:
        return "excluded", f"listed in {_kind_keys(kind, c.names)[2]}"
    if dep is not None:
        why = _why_wanted(rules, policy, name, c.names)
        if dep.digest is None and not c.settings.reload_on_create:
            why += "; missing now: its creation restarts only with --reload-on-create"
        return "watched", why
    match = config.match if config is not None else False
    return "not-wanted", _why_not_wanted(
        rules, policy, match=match, referenced=referenced, names=c.names
    )


def _candidates(
    uses: Sequence[Use], deps: Mapping[str, Dependency], snapshot: WorkloadSnapshot
) -> list[tuple[ConfigKind, str]]:
    """Configs worth a line: referenced, depended on, or named by exact name."""
    found = {(use.kind, use.name) for use in uses}
    found.update((dep.kind, dep.name) for dep in deps.values())
    for kind in CONFIG_KINDS:
        found.update((kind, name) for name in snapshot.policy.exact_names(kind))
    return sorted(found)


def _scope_reasons(facts: Facts, settings: Settings) -> list[str]:
    kind, namespace = facts.target.kind, facts.target.namespace
    reasons = []
    if kind.setting_name in settings.ignored_workload_types:
        reasons.append(f"--ignored-workload-types includes {kind.setting_name}")
    elif not settings.watches_workload(kind):
        reasons.append(f"{kind.name}s are watched only with --is-Argo-Rollouts")
    if settings.namespaces and namespace not in settings.namespaces:
        reasons.append(f"namespace {namespace} is not in --namespaces")
    if namespace in settings.namespaces_to_ignore:
        reasons.append(f"namespace {namespace} is in --namespaces-to-ignore")
    if facts.namespace_selected is False:
        selector = settings.namespace_label_selector
        reasons.append(f"namespace {namespace} does not match --namespace-selector ({selector})")
    return reasons


def _opt_in_reason(
    snapshot: WorkloadSnapshot, policies: Sequence[KindPolicy], settings: Settings
) -> str | None:
    """Why the workload opts in to nothing, or None when it opts in."""
    if snapshot.policy.opted_in:
        return None
    names = settings.annotation_names()
    for policy in policies:
        for key, value in policy.annotations.items():
            if key in (names.auto, _kind_keys(policy.kind, names)[1]) and value:
                also = " (also out of --auto-reload-all)" if settings.auto_reload_all else ""
                return f"{key}={value!r} on the {policy.source} turns reloading off{also}"
    return (
        f"no reloader annotation on the workload's metadata or pod template "
        f'(add {names.auto}: "true" to its metadata.annotations)'
    )


def _dependency_reason(
    deps: Mapping[str, Dependency], any_config: bool, reload_on_create: bool
) -> str | None:
    """Why an opted-in workload has nothing that can restart it, or None."""
    if not deps:
        if not any_config:
            return "it references no ConfigMap or Secret"
        return "none of the configs it references or names is watched (see configs)"
    if reload_on_create or any(dep.digest is not None for dep in deps.values()):
        return None
    missing = ", ".join(sorted(deps))
    return (
        f"the configs it depends on ({missing}) are missing or not seen by the controller: they "
        "cannot change, and their creation restarts only with --reload-on-create"
    )


def _record_text(snapshot: WorkloadSnapshot, key: DigestKey | None) -> str:
    recorded = snapshot.recorded
    if recorded is None or not recorded.usable:
        aside = f" (one was set aside: {recorded.reset})" if recorded and recorded.reset else ""
        return (
            f"no usable record{aside}: the controller records digests on first sight without "
            "restarting; the next change after that restarts"
        )
    if key is not None and recorded.key_id != key.key_id:
        return (
            f"recorded under digest key {recorded.key_id}, not {key.key_id}: the controller "
            "re-records without restarting (a key rotation, or another --hash-key here)"
        )
    return f"recorded under digest key {recorded.key_id}"


def _reload_now(
    decision: Decision | None, will_reload: bool, key_note: str
) -> tuple[bool | None, str]:
    if decision is None:
        return None, f"unknown: {key_note}"
    if not will_reload:
        return False, "no: the workload does not reload (see above)"
    if decision.action == "restart":
        changed = ", ".join(decision.triggers)
        return True, (
            f"yes: {changed} changed since the digests recorded on the workload; a running "
            "controller restarts it at once (if this persists, check that it runs and its logs)"
        )
    if decision.action == "record":
        return False, f"no: the controller would only record digests ({decision.reason})"
    return False, "no: the recorded digests match the configs as they are now"


def _decision(
    snapshot: WorkloadSnapshot, deps: Mapping[str, Dependency], key: DigestKey, s: Settings
) -> Decision:
    return decide(
        recorded=snapshot.recorded,
        deps=deps,
        key_id=key.key_id,
        reload_on_create=s.reload_on_create,
        reload_on_delete=s.reload_on_delete,
    )


def explain(facts: Facts, settings: Settings) -> Explanation:
    """The answer, computed by the controller's functions on ``facts``."""
    key = facts.key or DigestKey.from_secret(DigestKey.generate_secret())
    snapshot = workload_snapshot(facts.target.kind, facts.workload, context=_context(settings, key))
    deps = dependencies(snapshot, _visible(facts, settings), key=key)
    names = settings.annotation_names()
    spec = pod_template(facts.workload, facts.target.kind).get("spec")
    c = _Computed(
        facts=facts,
        settings=settings,
        names=names,
        snapshot=snapshot,
        deps=deps,
        decision=_decision(snapshot, deps, key, settings) if facts.key is not None else None,
        policies={
            kind: kind_policy(
                kind, facts, snapshot.policy.rules(kind), names, settings.auto_reload_all
            )
            for kind in CONFIG_KINDS
        },
        uses=reference_uses(spec if isinstance(spec, Mapping) else {}),
    )
    configs = tuple(_verdict(c, kind, name) for kind, name in _candidates(c.uses, deps, snapshot))
    reasons = _scope_reasons(facts, settings)
    if opt_out := _opt_in_reason(snapshot, list(c.policies.values()), settings):
        reasons.append(opt_out)
    elif dependency_gap := _dependency_reason(deps, bool(configs), settings.reload_on_create):
        reasons.append(dependency_gap)
    now, now_reason = _reload_now(c.decision, not reasons, facts.key_note)
    return Explanation(
        target=facts.target,
        will_reload=not reasons,
        reasons=tuple(reasons),
        reload_now=now,
        reload_now_reason=now_reason,
        key_id=facts.key.key_id if facts.key else None,
        key_note=facts.key_note,
        record=_record_text(snapshot, facts.key),
        policies=tuple(c.policies.values()),
        configs=configs,
        problems=tuple(
            {"annotation": p.annotation, "value": p.value, "reason": p.reason}
            for p in snapshot.problems
        ),
        last_reload=_marker(facts),
        events=_reloader_events(facts.events),
        notes=facts.notes,
    )


def _verdict(c: _Computed, kind: ConfigKind, name: str) -> ConfigVerdict:
    ident = config_id(kind, name)
    dep = c.deps.get(ident)
    mine = tuple(use for use in c.uses if (use.kind, use.name) == (kind, name))
    status, reason = _status(c, kind, name, referenced=bool(mine))
    recorded = c.snapshot.recorded.as_dict() if c.snapshot.recorded and c.comparable else {}
    return ConfigVerdict(
        kind=kind,
        name=name,
        exists=name in c.facts.configs[kind],
        status=status,
        reason=reason,
        uses=mine,
        recorded=recorded.get(ident),
        current=dep.digest if dep is not None and c.facts.key is not None else None,
        changed=c.decision is not None and ident in c.decision.triggers,
    )


def _iso(seconds: object) -> str | None:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _marker(facts: Facts) -> dict[str, Any] | None:
    """The restart marker on the pod template (ours or Stakater's), if any."""
    value = _annotations(pod_template(facts.workload, facts.target.kind)).get(LAST_RELOADED_FROM)
    if not value:
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {"kind": None, "name": None, "at": None}
    if not isinstance(parsed, dict):
        return {"kind": None, "name": None, "at": None}
    kind = {"CONFIGMAP": "ConfigMap", "SECRET": "Secret"}.get(str(parsed.get("type")))
    return {"kind": kind, "name": parsed.get("name"), "at": _iso(parsed.get("observedAt"))}


def _event_time(event: Mapping[str, Any]) -> str:
    metadata = event.get("metadata") or {}
    return str(
        event.get("lastTimestamp") or event.get("eventTime") or metadata.get("creationTimestamp")
    )


def _reloader_events(
    events: Sequence[Mapping[str, Any]], last: int = 5
) -> tuple[dict[str, str], ...]:
    """The workload's latest ``Reloaded`` Events and the controller's Warnings, oldest first."""
    mine = [
        e
        for e in events
        if e.get("reason") == "Reloaded"
        or (e.get("type") == "Warning" and _mapping(e.get("source")).get("component") == "reloader")
    ]
    mine.sort(key=_event_time)
    return tuple(
        {
            "time": _event_time(e),
            "type": str(e.get("type") or ""),
            "reason": str(e.get("reason") or ""),
            "message": str(e.get("message") or ""),
        }
        for e in mine[-last:]
    )


# --- output ------------------------------------------------------------------------------------


def _use_json(use: Use) -> dict[str, Any]:
    keys = list(use.keys) if use.keys is not None else None
    return {"container": use.container, "via": use.via, "volume": use.volume, "keys": keys}


def to_json(explanation: Explanation) -> dict[str, Any]:
    """The ``--output json`` document; its keys are documented in docs/troubleshooting.md."""
    target = explanation.target
    return {
        "workload": {"kind": target.kind.name, "namespace": target.namespace, "name": target.name},
        "willReload": explanation.will_reload,
        "reasons": list(explanation.reasons),
        "reloadNow": explanation.reload_now,
        "reloadNowReason": explanation.reload_now_reason,
        "digestKey": {"keyId": explanation.key_id, "note": explanation.key_note},
        "record": explanation.record,
        "policy": {
            p.kind: {
                "source": p.source,
                "annotations": dict(p.annotations),
                "autoReloadAll": p.auto_reload_all,
                "excluded": list(p.excluded),
            }
            for p in explanation.policies
        },
        "configs": [
            {
                "kind": c.kind,
                "name": c.name,
                "exists": c.exists,
                "status": c.status,
                "reason": c.reason,
                "uses": [_use_json(use) for use in c.uses],
                "recordedDigest": c.recorded,
                "currentDigest": c.current,
                "changed": c.changed,
            }
            for c in explanation.configs
        ],
        "problems": list(explanation.problems),
        "lastReload": {"marker": explanation.last_reload, "events": list(explanation.events)},
        "notes": list(explanation.notes),
    }


def _use_text(use: Use) -> str:
    where = f"container {use.container}" if use.container else "no container mounts it"
    volume = f" {use.volume}" if use.volume else ""
    keys = f" (keys {', '.join(use.keys)})" if use.keys else " (all keys)"
    return f"{where}: {use.via}{volume}{keys}"


def _config_lines(config: ConfigVerdict) -> Iterator[str]:
    missing = "" if config.exists else ", does not exist"
    yield f"  {config.kind}/{config.name}: {config.status}{missing}: {config.reason}"
    for use in config.uses:
        yield f"      used by {_use_text(use)}"
    if config.status == "watched" and config.current is not None:
        recorded = {None: "none yet", "": "as missing"}.get(config.recorded, config.recorded)
        state = "CHANGED since the record" if config.changed else "unchanged"
        yield f"      digest recorded {recorded}, current {config.current}: {state}"


def _policy_line(policy: KindPolicy) -> str:
    if policy.auto_reload_all:
        enabled = "--auto-reload-all"
    elif policy.annotations:
        pairs = ", ".join(f"{k}={v!r}" for k, v in policy.annotations.items())
        enabled = f"{pairs} on the {policy.source}"
    else:
        enabled = "nothing"
    excluded = f"; excluded: {', '.join(policy.excluded)}" if policy.excluded else ""
    return f"  {policy.kind}s: {enabled}{excluded}"


def render_text(explanation: Explanation) -> str:
    target = explanation.target
    head = f"{target.kind.name} {target.namespace}/{target.name}"
    lines = [
        f"{head}: reloads when a watched config changes"
        if explanation.will_reload
        else f"{head}: will NOT reload"
    ]
    lines += [f"  because {reason}" for reason in explanation.reasons]
    lines += ["Reloading enabled by:", *(_policy_line(p) for p in explanation.policies)]
    lines.append("Configs:" if explanation.configs else "Configs: none referenced or named")
    for config in explanation.configs:
        lines.extend(_config_lines(config))
    if explanation.problems:
        lines.append("Annotation problems (ignored by the controller):")
        lines += [
            f"  {p['annotation']}={p['value']!r}: {p['reason']}" for p in explanation.problems
        ]
    lines.append(f"Digest key: {explanation.key_id or 'unavailable'} ({explanation.key_note})")
    lines.append(f"Record: {explanation.record}")
    lines.append(f"Would it reload now? {explanation.reload_now_reason}")
    lines.append(f"Last reload: {_last_reload_text(explanation.last_reload)}")
    lines += [
        f"  {e['time']} {e['type']} {e['reason']}: {e['message']}" for e in explanation.events
    ]
    lines += [f"Note: {note}" for note in explanation.notes]
    return "\n".join(lines)


def _last_reload_text(marker: Mapping[str, Any] | None) -> str:
    if marker is None:
        return "no restart marker on the pod template"
    return f"{marker['kind']}/{marker['name']} at {marker['at']} (pod-template marker)"


# --- command line ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    target: Target
    output: Literal["text", "json"]
    settings: Settings


def build_explain_parser() -> argparse.ArgumentParser:
    """The controller's parser (every flag that affects decisions, same names and environment
    variables) plus the target, the namespace and the output format."""
    parser = build_parser()
    parser.prog = "reloader explain"
    parser.description = "Explain whether and why a workload reloads when its configs change."
    parser.allow_abbrev = False
    parser.add_argument("target", metavar="KIND/NAME", help="e.g. deployment/web, sts/db, cj/x")
    parser.add_argument("-n", "--namespace", dest="explain_namespace", default="default")
    parser.add_argument(
        "-o", "--output", dest="explain_output", choices=("text", "json"), default="text"
    )
    return parser


def _target(text: str, namespace: str) -> Target:
    kind_text, slash, name = text.partition("/")
    kind_name = KIND_NAMES.get(kind_text.lower().split(".")[0])
    if not slash or not name or kind_name is None:
        known = ", ".join(sorted(KIND_NAMES))
        raise ExplainError(f"expected KIND/NAME with KIND one of {known}; got {text!r}")
    return Target(KINDS[kind_name], namespace, name)


def parse_command(argv: Sequence[str]) -> Command:
    """Parse like the controller does; argparse exits 2 itself on a malformed command line."""
    given = vars(build_explain_parser().parse_args(list(argv)))
    target = _target(given.pop("target"), given.pop("explain_namespace"))
    output = given.pop("explain_output")
    try:
        settings = Settings(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        raise ExplainError(f"invalid settings: {problems}") from None
    return Command(target, output, settings)


async def explain_workload(api: Api, target: Target, settings: Settings) -> Explanation:
    """Read and answer: what the command does after parsing (tests call it in-process)."""
    return explain(await gather(api, target, settings), settings)


async def _run(command: Command) -> Explanation:
    try:
        api = await connect(kubeconfig=command.settings.kubeconfig)
    except Exception as error:  # any failure to configure a client (no file, bad file) is exit 2
        raise ExplainError(f"cannot configure a client: {error}") from error
    try:
        return await explain_workload(api, command.target, command.settings)
    finally:
        await api.close()


def main(argv: Sequence[str]) -> int:
    """``reloader explain …``: print the answer; return the exit code."""
    output = "json" if any(a in ("-ojson", "--output=json") for a in argv) else "text"
    try:
        command = parse_command(argv)
        output = command.output
        explanation = asyncio.run(_run(command))
    except ExplainError as error:
        if output == "json":
            print(orjson.dumps({"error": str(error)}).decode())
        print(f"reloader explain: {error}", file=sys.stderr)
        return EXIT_ERROR
    if command.output == "json":
        print(orjson.dumps(to_json(explanation), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_text(explanation))
    return EXIT_RELOADS if explanation.will_reload else EXIT_DOES_NOT_RELOAD
