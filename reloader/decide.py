"""The level-triggered heart: what a workload's pods should run vs what they were started with.

Two pure steps:

1. ``dependencies`` — which configs this workload depends on *now*, given its policy and the configs
   in its namespace, with the digest of what it reads from each (``None`` when the config is
   missing).
2. ``decide`` — compare those digests with the ones recorded on the workload:

   - no record yet (first sight, or opt-in just now), or a record set aside because it does not
     belong to this object and template (``snapshots.bind_record``) → record only: no restart on
     opt-in, no mass restart when the controller starts for the first time or is upgraded, and none
     for a template edit (its pods roll anyway and read the configs as they are now);
   - a record made under another digest key → re-record only (key rotation is not a change);
   - a recorded digest differs from the current one → restart, naming the configs that changed;
   - a config recorded as missing that exists now → restart only with reload-on-create, else
     record; a config that is not in the record at all merely became a dependency (an opt-in, a
     named list edited) → record only;
   - a recorded config that is now missing → restart only with reload-on-delete (then recorded as
     missing); otherwise its entry is kept, so the config coming back with other content restarts,
     and with the same content does not;
   - entries for configs no longer depended on are dropped (record only);
   - otherwise nothing.

A SecretProviderClass (CSI) is looked up per workload (``model.workload_config_name``): its digest
is of the versions the workload's own newest pod holds (``csi.py``). While no pod of the workload
reports the class it is no dependency at all, rather than a missing config: pods that start later
mount the class as it is then, so their first report is recorded, never restarted for, even with
reload-on-create; and scaling to zero prunes the entry instead of counting as a delete.

Because the inputs are state, not events, replaying any of this (a controller restart, a relist, a
retry) never restarts twice for one change: after the restart the record equals the desired state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from reloader.digests import ABSENT, DigestKey, Recorded, reference_digest
from reloader.model import CONFIG_KINDS, SPC, ConfigKey, ConfigKind, workload_config_name
from reloader.snapshots import ConfigSnapshot, WorkloadSnapshot


def config_id(kind: ConfigKind, name: str) -> str:
    """How a config is named inside a workload's record (the namespace is the workload's)."""
    return f"{kind}/{name}"


@dataclass(frozen=True, slots=True)
class Dependency:
    kind: ConfigKind
    name: str
    digest: str | None
    containers: tuple[str, ...]

    @property
    def id(self) -> str:
        return config_id(self.kind, self.name)


def _referenced(
    workload: WorkloadSnapshot,
    configs: Mapping[ConfigKind, Mapping[str, ConfigSnapshot]],
    key: DigestKey,
) -> dict[str, Dependency]:
    found: dict[str, Dependency] = {}
    for ref in workload.references:
        if ref.kind not in configs:
            continue  # a kind the controller does not watch (--resources-to-ignore)
        if ref.kind == SPC:
            snapshot = configs[SPC].get(workload_config_name(ref.name, workload.key))
            if snapshot is None:
                continue  # no pod of this workload reports the class yet (module docstring)
        else:
            snapshot = configs[ref.kind].get(ref.name)
        if snapshot is not None and snapshot.ignore:
            continue
        match = snapshot.match if snapshot is not None else False
        if not workload.policy.wants(ref.kind, ref.name, referenced=True, match=match):
            continue
        config = ConfigKey(ref.kind, workload.key.namespace, ref.name)
        digest = (
            reference_digest(snapshot.digests, ref.keys, key=key, config=config)
            if snapshot
            else None
        )
        found[config_id(ref.kind, ref.name)] = Dependency(
            ref.kind, ref.name, digest, ref.containers
        )
    return found


def _named(
    workload: WorkloadSnapshot,
    configs: Mapping[ConfigKind, Mapping[str, ConfigSnapshot]],
    key: DigestKey,
    already: Mapping[str, Dependency],
) -> dict[str, Dependency]:
    """Configs listed in ``…/reload`` but not referenced by the pod spec (Stakater allows this)."""
    policy, found = workload.policy, {}
    first = (workload.first_container,) if workload.first_container else ()
    for kind in CONFIG_KINDS:
        if kind not in configs:
            continue
        candidates = set(policy.exact_names(kind))
        if policy.has_regex(kind):
            candidates.update(configs[kind])
        for name in candidates:
            ident = config_id(kind, name)
            if ident in already or not policy.wants(kind, name, referenced=False, match=False):
                continue
            snapshot = configs[kind].get(name)
            if snapshot is not None and snapshot.ignore:
                continue
            config = ConfigKey(kind, workload.key.namespace, name)
            digest = (
                reference_digest(snapshot.digests, None, key=key, config=config)
                if snapshot
                else None
            )
            found[ident] = Dependency(kind, name, digest, first)
    return found


def dependencies(
    workload: WorkloadSnapshot,
    configs: Mapping[ConfigKind, Mapping[str, ConfigSnapshot]],
    *,
    key: DigestKey,
) -> dict[str, Dependency]:
    """Config id → dependency, for the configs of the workload's namespace given in ``configs``."""
    if not workload.policy.opted_in:
        return {}
    found = _referenced(workload, configs, key)
    found.update(_named(workload, configs, key, found))
    return found


Action = Literal["restart", "record", "nothing"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do; ``reset`` names why a record on the object was not used (``format``, ``uid``,
    ``template``, ``stale``, ``digest_key``), for the ``reloader_record_resets_total`` metric."""

    action: Action
    record: Recorded | None
    triggers: tuple[str, ...]
    reason: str
    reset: str | None = None


def _next_record(
    recorded: Mapping[str, str], deps: Mapping[str, Dependency], *, reload_on_delete: bool
) -> dict[str, str]:
    """Every dependency's digest, ``ABSENT`` for a missing one unless reload-on-delete is off and a
    digest was recorded for it (kept, so its return with other content restarts)."""
    record = {ident: dep.digest or ABSENT for ident, dep in deps.items()}
    if not reload_on_delete:
        missing = (ident for ident, dep in deps.items() if dep.digest is None)
        record.update({ident: recorded[ident] for ident in missing if recorded.get(ident)})
    return record


def _bound(
    recorded: Recorded | None, key_id: str, configs: Mapping[str, str], restarted_at: int | None
) -> Recorded:
    """A new record for the same object and template as ``recorded``."""
    uid, template = (recorded.uid, recorded.template) if recorded is not None else ("", "")
    return Recorded.of(key_id, configs, restarted_at=restarted_at, uid=uid, template=template)


def _fresh(
    recorded: Recorded | None, deps: Mapping[str, Dependency], key_id: str, reload_on_delete: bool
) -> Decision:
    """Record what is there now, with no comparison: nothing usable was recorded."""
    if not deps:
        return Decision("nothing", None, (), "no configs to watch")
    record = _next_record({}, deps, reload_on_delete=reload_on_delete)
    reset = recorded.reset if recorded is not None else None
    reason = f"record set aside ({reset})" if reset else "first sight"
    restarted_at = recorded.restarted_at if recorded is not None else None
    return Decision("record", _bound(recorded, key_id, record, restarted_at), (), reason, reset)


def decide(
    *,
    recorded: Recorded | None,
    deps: Mapping[str, Dependency],
    key_id: str,
    reload_on_create: bool,
    reload_on_delete: bool,
) -> Decision:
    """Compare desired and recorded digests; see the module docstring for the table."""
    if recorded is None or not recorded.usable:
        return _fresh(recorded, deps, key_id, reload_on_delete)
    if recorded.key_id != key_id:
        record = _next_record({}, deps, reload_on_delete=reload_on_delete)
        rekeyed = _bound(recorded, key_id, record, recorded.restarted_at)
        return Decision("record", rekeyed, (), "digest key changed", "digest_key")
    before = recorded.as_dict()
    present = {i: d.digest for i, d in deps.items() if d.digest is not None}
    changed = [i for i, digest in present.items() if before.get(i, ABSENT) not in (ABSENT, digest)]
    created = [i for i in present if before.get(i) == ABSENT]
    deleted = [i for i, d in deps.items() if d.digest is None and before.get(i, ABSENT) != ABSENT]
    triggers = (
        changed + (created if reload_on_create else []) + (deleted if reload_on_delete else [])
    )
    updated = _bound(
        recorded,
        key_id,
        _next_record(before, deps, reload_on_delete=reload_on_delete),
        recorded.restarted_at,  # the restarter stamps a new time when it restarts
    )
    if triggers:
        return Decision("restart", updated, tuple(sorted(triggers)), "config changed")
    if updated != recorded:
        return Decision("record", updated, (), "dependencies changed")
    return Decision("nothing", None, (), "up to date")
