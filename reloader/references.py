"""Pod spec → the ConfigMaps and Secrets it uses: one ``ConfigRef`` per (kind, name).

Why keys matter: a reference records which data keys the pod reads (``configMapKeyRef.key``, a
volume's ``items``), or ``None`` when it reads the whole object (``envFrom``, a volume without
``items``). The digest of a reference covers only those keys, so editing a key that no container
reads restarts nothing. Stakater hashes the whole object, so any edit restarts every user; this is
a deliberate improvement. When uses disagree, the widest wins: one whole-object use makes the
reference whole-object, otherwise the keys are the union.

Found, in ``containers`` and ``initContainers``: ``env[].valueFrom.configMapKeyRef`` and
``secretKeyRef``, ``envFrom[].configMapRef`` and ``secretRef``. In ``volumes``: ``configMap``,
``secret`` and ``projected.sources[].configMap`` / ``secret``. A volume is attributed to the
containers (init or not) that mount it. A volume nobody mounts is still a reference with no
containers: it is in the pod spec, and the kubelet fetches it for every pod.

With ``csi=True`` (``--enable-csi-integration``), a ``csi`` volume whose
``volumeAttributes.secretProviderClass`` names a class is a reference to that SecretProviderClass
(whole object, as Stakater matches it, whatever the driver); without it, it is no reference at all.

Deliberately not detected, as in Stakater: ``imagePullSecrets`` (used only to pull images),
a ``csi`` volume's ``nodePublishSecretRef``, service-account token
secrets, the credentials of other volume plugins (``cephfs``, ``rbd``, ``azureFile``,
``flexVolume``…), ``ephemeralContainers``, and references from other objects (Ingress TLS…).

Malformed input never raises: a field of the wrong type is treated as absent. A key reference
without a ``key`` (which the API server would reject) counts as reading the whole object, so it can
only cause a restart, never hide one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import get_args

from reloader.framing import framed, text_of, unframed, utf8
from reloader.model import SPC, ConfigKind, ConfigRef

PackedReferences = bytes
"""A workload's references in one bytes object (``pack_references``): every opted-in workload keeps
them for as long as it exists, and a ``ConfigRef`` per reference (64 bytes, plus its name as a
string of its own) was the largest part of a cached Deployment."""

_Source = tuple[ConfigKind, str, frozenset[str] | None]
"""(kind, name, keys) named by one volume, before containers are attributed."""

_ENV_KEY_REFS: tuple[tuple[str, ConfigKind], ...] = (
    ("configMapKeyRef", "ConfigMap"),
    ("secretKeyRef", "Secret"),
)
_ENV_FROM_REFS: tuple[tuple[str, ConfigKind], ...] = (
    ("configMapRef", "ConfigMap"),
    ("secretRef", "Secret"),
)
_VOLUME_SOURCES: tuple[tuple[str, ConfigKind, str], ...] = (
    ("configMap", "ConfigMap", "name"),
    ("secret", "Secret", "secretName"),
)
_PROJECTED_SOURCES: tuple[tuple[str, ConfigKind], ...] = (
    ("configMap", "ConfigMap"),
    ("secret", "Secret"),
)


def find_references(pod_spec: Mapping[str, object], *, csi: bool = False) -> tuple[ConfigRef, ...]:
    """Every config the pod spec uses, merged to one reference per (kind, name) and sorted by
    them; SecretProviderClasses of CSI volumes too when ``csi``."""
    if not isinstance(pod_spec, Mapping):
        return ()
    containers = [*_dicts(pod_spec.get("containers")), *_dicts(pod_spec.get("initContainers"))]
    uses = [use for container in containers for use in _container_uses(container)]
    mounted_by = _mounts(containers)
    for volume in _dicts(pod_spec.get("volumes")):
        users = _names(mounted_by.get(_text(volume.get("name")) or "", ()))
        uses.extend(ConfigRef(kind, name, keys, users) for kind, name, keys in _sources(volume))
        if csi and (spc := _provider_class(volume)):
            uses.append(ConfigRef(SPC, spc, None, users))
    return _merge(uses)


def _provider_class(volume: Mapping[str, object]) -> str | None:
    """The SecretProviderClass a CSI volume mounts (Secrets Store CSI driver), if any."""
    attributes = _mapping(_mapping(volume.get("csi")).get("volumeAttributes"))
    return _text(attributes.get("secretProviderClass"))


def _container_uses(container: Mapping[str, object]) -> Iterator[ConfigRef]:
    """References made through one container's environment."""
    name = _text(container.get("name"))
    users = _names((name,) if name else ())
    for env in _dicts(container.get("env")):
        value_from = _mapping(env.get("valueFrom"))
        for field, kind in _ENV_KEY_REFS:
            ref = _mapping(value_from.get(field))
            if config := _text(ref.get("name")):
                key = _text(ref.get("key"))
                yield ConfigRef(kind, config, frozenset({key}) if key else None, users)
    for env_from in _dicts(container.get("envFrom")):
        for field, kind in _ENV_FROM_REFS:
            if config := _text(_mapping(env_from.get(field)).get("name")):
                yield ConfigRef(kind, config, None, users)


def _mounts(containers: Iterable[Mapping[str, object]]) -> dict[str, set[str]]:
    """Volume name → names of the containers that mount it."""
    mounted_by: dict[str, set[str]] = {}
    for container in containers:
        name = _text(container.get("name"))
        for mount in _dicts(container.get("volumeMounts")):
            volume = _text(mount.get("name"))
            if name and volume:
                mounted_by.setdefault(volume, set()).add(name)
    return mounted_by


def _sources(volume: Mapping[str, object]) -> Iterator[_Source]:
    """The configs one volume projects: a plain configMap/secret volume or a projected one."""
    for field, kind, name_field in _VOLUME_SOURCES:
        source = _mapping(volume.get(field))
        if name := _text(source.get(name_field)):
            yield kind, name, _item_keys(source)
    for entry in _dicts(_mapping(volume.get("projected")).get("sources")):
        for field, kind in _PROJECTED_SOURCES:
            source = _mapping(entry.get(field))
            if name := _text(source.get("name")):
                yield kind, name, _item_keys(source)


def _item_keys(source: Mapping[str, object]) -> frozenset[str] | None:
    """The keys listed in ``items``; ``None`` (the whole object) when none are listed.

    The kubelet projects every key when ``items`` is absent or empty, and a list with no usable
    key is treated the same way, so a malformed list can never hide a change.
    """
    keys = {key for item in _dicts(source.get("items")) if (key := _text(item.get("key")))}
    return frozenset(keys) or None


def _merge(uses: Iterable[ConfigRef]) -> tuple[ConfigRef, ...]:
    """One reference per (kind, name), sorted: a tuple, not a set, because every opted-in
    workload keeps its references for as long as it exists (a frozenset of ten is 700 bytes, a
    tuple 136), and sorted so that equal pod specs give equal snapshots."""
    merged: dict[tuple[ConfigKind, str], ConfigRef] = {}
    for use in uses:
        ident = (use.kind, use.name)
        seen = merged.get(ident)
        merged[ident] = use if seen is None else _combine(seen, use)
    return tuple(ref for _, ref in sorted(merged.items()))


def _combine(a: ConfigRef, b: ConfigRef) -> ConfigRef:
    """Two uses of one config: whole-object beats keys; keys and containers unite."""
    keys = None if a.keys is None or b.keys is None else a.keys | b.keys
    return ConfigRef(a.kind, a.name, keys, _names((*a.containers, *b.containers)))


_KINDS: tuple[ConfigKind, ...] = get_args(ConfigKind)
"""A packed reference keeps its kind's index here (memory only: the order may change)."""
_WHOLE_OBJECT = b""
_SOME_KEYS = b"k"
"""Leads the keys part of a reference that reads some keys, so an empty set is not ``None``."""


def pack_references(references: Iterable[ConfigRef]) -> PackedReferences:
    """References, in their order, as four framed parts each: kind, name, keys, containers."""
    parts: list[bytes] = []
    for ref in references:
        keys = (
            _WHOLE_OBJECT
            if ref.keys is None
            else _SOME_KEYS + framed(utf8(key) for key in sorted(ref.keys))
        )
        containers = framed(utf8(name) for name in ref.containers)
        parts += [_KINDS.index(ref.kind).to_bytes(1, "big"), utf8(ref.name), keys, containers]
    return framed(parts)


def unpack_references(packed: PackedReferences) -> tuple[ConfigRef, ...]:
    """The references ``pack_references`` packed; built anew on each call (do not keep them)."""
    parts = unframed(packed)
    return tuple(_unpacked(*parts[at : at + 4]) for at in range(0, len(parts), 4))


def _unpacked(kind: bytes, name: bytes, keys: bytes, containers: bytes) -> ConfigRef:
    return ConfigRef(
        _KINDS[kind[0]],
        text_of(name),
        None if keys == _WHOLE_OBJECT else frozenset(map(text_of, unframed(keys[1:]))),
        tuple(map(text_of, unframed(containers))),
    )


def _names(names: Iterable[str]) -> tuple[str, ...]:
    """Container names, sorted and deduplicated."""
    return tuple(sorted(set(names)))


def _dicts(value: object) -> Iterator[Mapping[str, object]]:
    """The mapping items of a JSON list; anything else yields nothing."""
    if isinstance(value, list | tuple):
        yield from (item for item in value if isinstance(item, Mapping))


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    """A non-empty string, else None: empty or missing names are no reference."""
    return value if isinstance(value, str) and value else None
