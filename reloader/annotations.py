"""Stakater's workload annotations → a ``Policy``: which configs a workload reacts to.

The annotations are parsed once per workload change (``snapshots.py``); ``Policy.wants`` then
answers the per-(config, workload) question on the hot path without reading annotations again.
Problems (a boolean that is not one, a bad regular expression, a bad duration) are returned as
values, never raised: one bad item is reported once, and the rest of the policy still applies.

The semantics are those of Stakater's ``ShouldReload`` (notes §1.2), **per config kind**:

- The named list, ``search``, ``auto`` and the typed auto *for that kind* are read from the
  workload's metadata. Only if none of those four keys is present there are they read from the pod
  template instead. So ``secret.reloader.stakater.com/reload`` on the metadata hides a template
  ``auto`` for Secrets but not for ConfigMaps: odd, but it is what Stakater does.
- Exclude lists, the pause period and the rollout strategy come from workload metadata only.
- The decision: an excluded name → no; a named-list match → yes, referenced or not; otherwise the
  pod spec must reference the config, and one of these must hold: ``search`` with the config's
  ``match``, ``auto``, the typed auto, or ``--auto-reload-all`` with both auto keys empty or absent.
  An unparsable boolean is therefore "set but false": it opts out of ``--auto-reload-all``.

Deliberate differences from Stakater:

- Named-list items are Python ``re`` patterns that must match the *whole* name, i.e.
  ``^(?:item)$``. Stakater compiles ``"^" + item + "$"`` with Go's RE2, where a top-level ``a|b``
  means "starts with a or ends with b"; here it means "a or b", which is what people write it for.
  RE2 and Python agree on everything a config name pattern needs; syntax they read differently
  (``\\z``, ``\\Q…\\E``, ``\\p{…}``, ``[[:alpha:]]``) is reported as a problem rather than half
  understood.
- Empty list items are skipped (Stakater compiles ``^$``, which matches no config anyway).
- Stakater ignores unparsable values silently; here each is a ``Problem``, with the same effect.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from reloader.model import CONFIG_KINDS, ConfigKind

RolloutStrategy = Literal["rollout", "restart"]

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
"""Exactly what Go's ``strconv.ParseBool`` accepts."""

_REGEX_META = frozenset("\\.+*?()|[]{}^$")
"""An item with none of these matches exactly one name: itself, so the index can look it up."""


@dataclass(frozen=True, slots=True)
class AnnotationNames:
    """The annotation keys in force (renameable by Stakater's flags)."""

    auto: str = "reloader.stakater.com/auto"
    configmap_auto: str = "configmap.reloader.stakater.com/auto"
    secret_auto: str = "secret.reloader.stakater.com/auto"
    configmap_reload: str = "configmap.reloader.stakater.com/reload"
    secret_reload: str = "secret.reloader.stakater.com/reload"
    search: str = "reloader.stakater.com/search"
    match: str = "reloader.stakater.com/match"
    ignore: str = "reloader.stakater.com/ignore"
    configmaps_exclude: str = "configmaps.exclude.reloader.stakater.com/reload"
    secrets_exclude: str = "secrets.exclude.reloader.stakater.com/reload"
    pause_period: str = "deployment.reloader.stakater.com/pause-period"
    paused_at: str = "deployment.reloader.stakater.com/paused-at"
    rollout_strategy: str = "reloader.stakater.com/rollout-strategy"


DEFAULT_NAMES = AnnotationNames()
"""Stakater's keys, before any renaming flag."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One annotation value that could not be used; workload annotations are not secret."""

    annotation: str
    value: str
    reason: str


@functools.lru_cache(maxsize=4096)
def _pattern(item: str) -> re.Pattern[str]:
    """Compile each distinct item once: ``wants`` runs for every (config, workload) pair.

    Warnings are errors here because Python only *warns* about some RE2 syntax that it reads
    differently (``[[:alpha:]]`` is a character class to RE2 and a nested set to Python), and a
    silently different pattern is worse than a reported one.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return re.compile(item)


@dataclass(frozen=True, slots=True)
class KindRules:
    """How a workload reacts to one kind of config. Every field compares by value."""

    names: frozenset[str] = frozenset()
    """Named-list items without regex metacharacters: each matches only itself."""
    patterns: frozenset[str] = frozenset()
    """Named-list items that are real patterns; all of them compile."""
    excluded: frozenset[str] = frozenset()
    search: bool = False
    auto: bool = False
    """``auto``, the typed auto, or ``--auto-reload-all`` with both of them unset."""

    @property
    def active(self) -> bool:
        return bool(self.names or self.patterns or self.search or self.auto)

    def named(self, name: str) -> bool:
        """Whether ``name`` matches the named list (exclusion is checked by the caller)."""
        return name in self.names or any(_pattern(item).fullmatch(name) for item in self.patterns)


@dataclass(frozen=True, slots=True)
class Policy:
    """A workload's parsed annotations; equal whenever they would decide the same way."""

    configmaps: KindRules = field(default_factory=KindRules)
    secrets: KindRules = field(default_factory=KindRules)
    pause_period: float | None = None
    """Seconds, from ``pause-period``; meaningful for Deployments only."""
    rollout_strategy: RolloutStrategy = "rollout"
    """From ``rollout-strategy``; meaningful for Argo Rollouts only."""

    def rules(self, kind: ConfigKind) -> KindRules:
        return self.configmaps if kind == "ConfigMap" else self.secrets

    @property
    def opted_in(self) -> bool:
        """Whether any config could make this workload restart; if not, nothing is indexed."""
        return self.configmaps.active or self.secrets.active

    def wants(self, kind: ConfigKind, name: str, *, referenced: bool, match: bool) -> bool:
        """Stakater's decision for one config (steps 4 to 7 of §1.2).

        ``referenced``: the pod spec uses the config; ``match``: the config carries ``match``.
        The config's own ``ignore`` and ignored workload kinds are the caller's business.
        """
        rules = self.rules(kind)
        if name in rules.excluded:
            return False
        if rules.named(name):
            return True
        return referenced and (rules.auto or (rules.search and match))

    def exact_names(self, kind: ConfigKind) -> frozenset[str]:
        """Named-list items the index can look up by name."""
        return self.rules(kind).names

    def has_regex(self, kind: ConfigKind) -> bool:
        """Whether the named list holds a pattern, so every config of the kind must be tried."""
        return bool(self.rules(kind).patterns)


@dataclass(frozen=True, slots=True)
class _KindKeys:
    reload: str
    auto: str
    exclude: str


def _kind_keys(kind: ConfigKind, names: AnnotationNames) -> _KindKeys:
    if kind == "ConfigMap":
        return _KindKeys(names.configmap_reload, names.configmap_auto, names.configmaps_exclude)
    return _KindKeys(names.secret_reload, names.secret_auto, names.secrets_exclude)


def parse_policy(
    workload_annotations: Mapping[str, str] | None,
    template_annotations: Mapping[str, str] | None,
    *,
    names: AnnotationNames,
    auto_reload_all: bool,
) -> tuple[Policy, tuple[Problem, ...]]:
    """Parse once; problems come sorted, so an unchanged set compares equal and is reported once."""
    meta = _strings(workload_annotations)
    template = _strings(template_annotations)
    problems: set[Problem] = set()
    configmaps, secrets = (
        _kind_rules(
            kind, meta, template, names=names, auto_reload_all=auto_reload_all, problems=problems
        )
        for kind in CONFIG_KINDS
    )
    policy = Policy(
        configmaps=configmaps,
        secrets=secrets,
        pause_period=_pause_period(meta, names.pause_period, problems),
        rollout_strategy=_rollout_strategy(meta, names.rollout_strategy, problems),
    )
    ordered = sorted(problems, key=lambda p: (p.annotation, p.value, p.reason))
    return policy, tuple(ordered)


def _strings(annotations: Mapping[str, str] | None) -> dict[str, str]:
    """Entries with a non-string key or value are dropped: a malformed body must not raise."""
    if not isinstance(annotations, Mapping):
        return {}
    return {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}


def _kind_rules(
    kind: ConfigKind,
    meta: Mapping[str, str],
    template: Mapping[str, str],
    *,
    names: AnnotationNames,
    auto_reload_all: bool,
    problems: set[Problem],
) -> KindRules:
    """One kind's rules. The metadata-or-template switch is per kind, as in ``ShouldReload``."""
    keys = _kind_keys(kind, names)
    switches = (keys.reload, names.search, names.auto, keys.auto)
    source = meta if any(key in meta for key in switches) else template
    literal, patterns = _named_list(source, keys.reload, problems)
    auto = _parse_bool(source, names.auto, problems)
    typed_auto = _parse_bool(source, keys.auto, problems)
    unset = source.get(names.auto, "") == "" and source.get(keys.auto, "") == ""
    return KindRules(
        names=literal,
        patterns=patterns,
        excluded=frozenset(_items(meta.get(keys.exclude))),
        search=_search(source, names.search, problems),
        auto=auto or typed_auto or (auto_reload_all and unset),
    )


def _items(value: str | None) -> list[str]:
    """A comma list, items trimmed, empty items skipped."""
    if not value:
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def _named_list(
    annotations: Mapping[str, str], key: str, problems: set[Problem]
) -> tuple[frozenset[str], frozenset[str]]:
    """(literal names, valid patterns); an item that does not compile is reported and skipped."""
    literal: set[str] = set()
    patterns: set[str] = set()
    for item in _items(annotations.get(key)):
        if _REGEX_META.isdisjoint(item):
            literal.add(item)
            continue
        try:
            _pattern(item)
        except (re.error, FutureWarning) as error:
            problems.add(Problem(key, item, f"not a valid regular expression: {error}"))
        else:
            patterns.add(item)
    return frozenset(literal), frozenset(patterns)


def _parse_bool(annotations: Mapping[str, str], key: str, problems: set[Problem]) -> bool:
    value = annotations.get(key)
    if value is None:
        return False
    if value not in _TRUE and value not in _FALSE:
        problems.add(Problem(key, value, "not a boolean (use true or false)"))
    return value in _TRUE


def _search(annotations: Mapping[str, str], key: str, problems: set[Problem]) -> bool:
    """Only the exact string ``true`` enables search (Stakater compares strings, not booleans)."""
    value = annotations.get(key)
    if value is not None and value not in ("true", "false"):
        problems.add(Problem(key, value, 'only the exact value "true" enables search'))
    return value == "true"


def _pause_period(annotations: Mapping[str, str], key: str, problems: set[Problem]) -> float | None:
    value = annotations.get(key)
    if value is None:
        return None
    seconds = parse_go_duration(value)
    if seconds is None:
        problems.add(Problem(key, value, 'not a Go duration (e.g. "5m", "1h30m", "90s")'))
        return None
    if seconds < 0:
        problems.add(Problem(key, value, "a pause period cannot be negative"))
        return None
    return seconds


def _rollout_strategy(
    annotations: Mapping[str, str], key: str, problems: set[Problem]
) -> RolloutStrategy:
    """``restart`` or, for anything else, ``rollout``: Stakater's default for unknown values."""
    value = annotations.get(key)
    if value == "restart":
        return "restart"
    if value and value != "rollout":
        problems.add(Problem(key, value, 'not "rollout" or "restart"; using "rollout"'))
    return "rollout"


_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
_UNIT = "(?:ns|us|µs|μs|ms|s|m|h)"  # longest first, so "ms" is never read as "m" + "s"
_DURATION = re.compile(rf"[-+]?(?:0|(?:{_NUMBER}{_UNIT})+)")
_DURATION_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_MAX_SECONDS = (2**63 - 1) / 1e9
"""Go durations are int64 nanoseconds; longer ones (about 292 years) do not parse."""


def parse_go_duration(text: str) -> float | None:
    """Seconds for a Go ``time.ParseDuration`` string ("1h30m", "1.5s", "-2m", "0"), else None."""
    if not _DURATION.fullmatch(text):
        return None
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds > _MAX_SECONDS:
        return None
    return -seconds if text.startswith("-") else seconds
