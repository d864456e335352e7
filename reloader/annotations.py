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
- The pause period and the rollout strategy come from workload metadata only.
- A SecretProviderClass (CSI, ``--enable-csi-integration``) is a third kind with the same rules
  and its own keys: ``secretproviderclass.reloader.stakater.com/auto`` and ``…/reload``,
  ``secretproviderclasses.exclude.reloader.stakater.com/reload``; ``reloader.stakater.com/auto``
  covers it too, as in Stakater. Stakater has no flags to rename these keys.
- Exclude lists on the metadata always apply. An exclude list on the pod template applies when the
  template is where that kind's keys are read from (none of the four on the metadata), added to
  the metadata's. Stakater reads exclude lists from the metadata only, but its own e2e suite
  expects ``auto`` plus an exclude list on the template to exclude (a pending test marked TODO);
  this is that case, and the template is read exactly when Stakater reads it for the other keys.
- The decision: an excluded name → no; a named-list match → yes, referenced or not; otherwise the
  pod spec must reference the config, and one of these must hold: ``search`` with the config's
  ``match``, ``auto``, the typed auto, or ``--auto-reload-all`` with both auto keys empty or absent.
  An unparsable boolean is therefore "set but false": it opts out of ``--auto-reload-all``.

Deliberate differences from Stakater:

- Named-list items are RE2 patterns (``google-re2``: the C++ library that Go's ``regexp`` copies;
  matching is linear in the name whatever the pattern, so ``(a|a)*b`` cannot stall the event loop)
  that must match the *whole* name, as ``^(?:item)$`` would. Stakater compiles ``"^" + item + "$"``,
  where a top-level ``a|b`` means "starts with a or ends with b"; here it means "a or b", which is
  what people write it for. The syntax is Go's: ``\\z``, ``\\Q…\\E``, ``\\pL``, ``[[:alpha:]]`` and
  ``(?i)`` all work. Where the C++ library accepts what Go refuses, the item is a problem, as in Go:
  ``\\C`` (any byte), and a repeat count of nine digits or more (C++ reads ``a{4294967296}`` as
  literal text; Go refuses it). Counts over 1000 are refused by both. C++ accepts nesting deeper
  than Go's limit of 1000 levels; that is harmless (still linear) and accepted here. A pattern
  whose compiled program needs more than ``RE2_MAX_MEM`` bytes is a problem.
- A named list longer than ``MAX_LIST_CHARS`` characters or with more than ``MAX_LIST_ITEMS`` items
  is refused whole (a problem; the key still counts as present for the metadata-or-template
  switch): applying part of a list would restart on some of its names and silently not on others.
  Exclude lists are exact names looked up in a set, so they are not capped: refusing one would
  restart *more*.
- Empty list items are skipped (Stakater compiles ``^$``, which matches no config anyway).
- Stakater ignores unparsable values silently; here each is a ``Problem``, with the same effect.
  No value raises: an exception in the informer's transform would leave the workload's previous
  snapshot in force.
- ``pause-period`` is read by a one-pass copy of Go's ``time.ParseDuration`` (same accept set, same
  int64-nanosecond overflow rules), so a hostile value costs time linear in its length.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from reloader.model import CONFIG_KINDS, SPC, ConfigKind

RolloutStrategy = Literal["rollout", "restart"]

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
"""Exactly what Go's ``strconv.ParseBool`` accepts."""

_REGEX_META = frozenset("\\.+*?()|[]{}^$")
"""An item with none of these matches exactly one name: itself, so the index can look it up."""

_NONE: frozenset[str] = frozenset()
"""Shared by every empty list: a policy holds nine, and thousands of policies are cached."""


def _frozen(items: Iterable[str]) -> frozenset[str]:
    found = frozenset(items)
    return found if found else _NONE


MAX_LIST_CHARS = 4096
"""A named list longer than this is refused; 64 names of 63 characters fit."""
MAX_LIST_ITEMS = 64
"""A named list with more items than this is refused: past it, ``auto`` or a pattern is the tool."""
RE2_MAX_MEM = 256 << 10
"""Bytes one compiled pattern may use (RE2's default is 8 MiB); with the ``_pattern`` cache's size
this bounds what patterns can cost in all (128 MiB at the very worst). Config names are at most
253 lowercase ASCII characters: ``[a-z0-9.-]{1,253}`` fits easily; ``\\pL{1,63}`` does not."""
_PROBLEM_VALUE_CHARS = 80
"""How much of a rejected value a ``Problem`` keeps; the annotation itself can hold 256 KiB."""


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
    spc_auto: str = "secretproviderclass.reloader.stakater.com/auto"
    spc_reload: str = "secretproviderclass.reloader.stakater.com/reload"
    spcs_exclude: str = "secretproviderclasses.exclude.reloader.stakater.com/reload"
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
    """The offending value or item, cut to ``_PROBLEM_VALUE_CHARS`` (an Event quotes it)."""
    reason: str

    @property
    def text(self) -> str:
        """One line for a log or an Event."""
        return f"{self.annotation}={self.value!r}: {self.reason}"


def _problem(annotation: str, value: str, reason: str) -> Problem:
    return Problem(annotation, _clip(value), reason)


def _re2_options() -> Any:
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False  # each error becomes a Problem; RE2 would also print it to stderr
    return options


_OPTIONS = _re2_options()
_GO_REFUSES = re2.compile(
    r"(?:^|[^\\])(?:\\\\)*"  # an even run of backslashes: what follows is not escaped
    r"(?:\\C|\{[1-9][0-9]{8,}\})",
    _OPTIONS,
)
"""``\\C``, or a repeat count of nine digits or more: the C++ library accepts them, Go does not.
Only ``{n}`` needs looking for: ``{n,}`` and ``{n,m}`` hold a comma, which splits the list."""


@functools.lru_cache(maxsize=512)
def _pattern(item: str) -> Any:
    """Compile each distinct item once: ``wants`` runs for every (config, workload) pair.

    Raises ``PatternError`` with RE2's reason for anything Go's ``regexp.Compile`` would refuse.
    A failed item is not cached; compiling it again costs time linear in its (capped) length. The
    compiled patterns live here only, not in each ``Policy``, so their memory stays bounded even
    when many workloads each name distinct patterns (they are then compiled again as needed).
    """
    try:
        if _GO_REFUSES.search(item):
            raise PatternError("\\C or a repeat count over 1000 (Go's regexp refuses both)")
        return re2.compile(item, _OPTIONS)
    except re2.error as error:
        raise PatternError(_text(error)) from None
    except (ValueError, OverflowError, RecursionError) as error:  # not UTF-8 (lone surrogate)
        raise PatternError(_clip(str(error))) from None


class PatternError(Exception):
    """A named-list item that is not a pattern Go's ``regexp`` would compile."""


def _text(error: Exception) -> str:
    """RE2's message (bytes, which echo part of the pattern), as bounded text."""
    (reason, *_) = error.args or ("invalid pattern",)
    text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return _clip(text)


def _clip(text: str, limit: int = _PROBLEM_VALUE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


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
    secretproviderclasses: KindRules = field(default_factory=KindRules)
    """Only read with ``--enable-csi-integration`` (without it no CSI volume is a reference)."""
    pause_period: float | None = None
    """Seconds, from ``pause-period``; meaningful for Deployments only."""
    rollout_strategy: RolloutStrategy = "rollout"
    """From ``rollout-strategy``; meaningful for Argo Rollouts only."""

    def rules(self, kind: ConfigKind) -> KindRules:
        if kind == SPC:
            return self.secretproviderclasses
        return self.configmaps if kind == "ConfigMap" else self.secrets

    @property
    def opted_in(self) -> bool:
        """Whether any config could make this workload restart; if not, nothing is indexed."""
        return self.configmaps.active or self.secrets.active or self.secretproviderclasses.active

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
    if kind == SPC:
        return _KindKeys(names.spc_reload, names.spc_auto, names.spcs_exclude)
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
    configmaps, secrets, spcs = (
        _kind_rules(
            kind, meta, template, names=names, auto_reload_all=auto_reload_all, problems=problems
        )
        for kind in (*CONFIG_KINDS, SPC)
    )
    policy = Policy(
        configmaps=configmaps,
        secrets=secrets,
        secretproviderclasses=spcs,
        pause_period=_pause_period(meta, names.pause_period, problems),
        rollout_strategy=_rollout_strategy(meta, names.rollout_strategy, problems),
    )
    ordered = sorted(problems, key=lambda p: (p.annotation, p.value, p.reason))
    return _shared(policy), tuple(ordered)


_SHARED_POLICIES: dict[Policy, Policy] = {}
SHARED_POLICIES_MAX = 256
"""Distinct policies kept for sharing. Most workloads carry one of a few policies (``auto:
"true"``, the typed autos, a search): 2,000 Deployments held 2,000 equal policies of four objects
each (about 280 B a workload). Named lists make a policy unique; when more than this many distinct
ones have been seen the table starts again, so hostile variety costs a bounded amount."""


def _shared(policy: Policy) -> Policy:
    """An equal policy parsed before, if any: snapshots of workloads with the same annotations
    then hold one object."""
    found = _SHARED_POLICIES.get(policy)
    if found is not None:
        return found
    if len(_SHARED_POLICIES) >= SHARED_POLICIES_MAX:
        _SHARED_POLICIES.clear()
    _SHARED_POLICIES[policy] = policy
    return policy


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
        excluded=_excluded(meta, source, keys.exclude),
        search=_search(source, names.search, problems),
        auto=auto or typed_auto or (auto_reload_all and unset),
    )


def _excluded(meta: Mapping[str, str], source: Mapping[str, str], key: str) -> frozenset[str]:
    """The metadata's list, plus the template's when the template is this kind's source."""
    names = _items(meta.get(key))
    if source is not meta:
        names += _items(source.get(key))
    return _frozen(names)


def _items(value: str | None) -> list[str]:
    """A comma list, items trimmed, empty items skipped."""
    if not value:
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def _named_list(
    annotations: Mapping[str, str], key: str, problems: set[Problem]
) -> tuple[frozenset[str], frozenset[str]]:
    """(literal names, valid patterns); an item that does not compile is reported and skipped."""
    value = annotations.get(key) or ""
    if len(value) > MAX_LIST_CHARS:
        reason = f"longer than {MAX_LIST_CHARS} characters; the whole list is ignored"
        problems.add(_problem(key, value, reason))
        return _NONE, _NONE
    items = _items(value)
    if len(items) > MAX_LIST_ITEMS:
        reason = f"more than {MAX_LIST_ITEMS} items; the whole list is ignored"
        problems.add(_problem(key, value, reason))
        return _NONE, _NONE
    literal: set[str] = set()
    patterns: set[str] = set()
    for item in items:
        if _REGEX_META.isdisjoint(item):
            literal.add(item)
            continue
        try:
            _pattern(item)
        except PatternError as error:
            problems.add(_problem(key, item, f"not a valid regular expression: {error}"))
        else:
            patterns.add(item)
    return _frozen(literal), _frozen(patterns)


def _parse_bool(annotations: Mapping[str, str], key: str, problems: set[Problem]) -> bool:
    value = annotations.get(key)
    if value is None:
        return False
    if value not in _TRUE and value not in _FALSE:
        problems.add(_problem(key, value, "not a boolean (use true or false)"))
    return value in _TRUE


def _search(annotations: Mapping[str, str], key: str, problems: set[Problem]) -> bool:
    """Only the exact string ``true`` enables search (Stakater compares strings, not booleans)."""
    value = annotations.get(key)
    if value is not None and value not in ("true", "false"):
        problems.add(_problem(key, value, 'only the exact value "true" enables search'))
    return value == "true"


def _pause_period(annotations: Mapping[str, str], key: str, problems: set[Problem]) -> float | None:
    value = annotations.get(key)
    if value is None:
        return None
    seconds = parse_go_duration(value)
    if seconds is None:
        problems.add(_problem(key, value, 'not a Go duration (e.g. "5m", "1h30m", "90s")'))
        return None
    if seconds < 0:
        problems.add(_problem(key, value, "a pause period cannot be negative"))
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
        problems.add(_problem(key, value, 'not "rollout" or "restart"; using "rollout"'))
    return "rollout"


_UNIT_NANOSECONDS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_LIMIT = 1 << 63
"""Go durations are int64 nanoseconds (about 292 years); Go's parser overflows past this."""
_CACHED_DURATION_CHARS = 64
"""Longer values are parsed every time (still linear) rather than kept in the cache."""


def parse_go_duration(text: str) -> float | None:
    """Seconds for a Go ``time.ParseDuration`` string ("1h30m", "1.5s", "-2m", "0"), else None.

    A workload is parsed again on every update (status writes included), so distinct short
    values are remembered; a long one is not worth the cache's memory.
    """
    if len(text) > _CACHED_DURATION_CHARS:
        return _seconds(text)
    return _cached_seconds(text)


@functools.lru_cache(maxsize=256)
def _cached_seconds(text: str) -> float | None:
    return _seconds(text)


def _seconds(text: str) -> float | None:
    nanoseconds = _go_duration(text)
    return None if nanoseconds is None else nanoseconds / 1e9


def _go_duration(text: str) -> int | None:
    """Go's ``time.ParseDuration`` in one pass, in nanoseconds: ``[-+]?([0-9]*(\\.[0-9]*)?unit)+``.

    Every number is checked against the limit digit by digit, as Go does, so no integer ever
    grows past 64 bits and the cost is linear in ``len(text)``.
    """
    negative = text[:1] == "-"
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest == "0":
        return 0
    if not rest:
        return None
    total, pos = 0, 0
    while pos < len(rest):
        part = _duration_part(rest, pos)
        if part is None:
            return None
        value, pos = part
        total += value
        if total > _LIMIT:
            return None
    if not negative and total > _LIMIT - 1:
        return None
    return -total if negative else total


def _duration_part(text: str, pos: int) -> tuple[int, int] | None:
    """One ``number unit`` at ``pos``: (nanoseconds, position after it), or None if invalid."""
    whole, after_whole = _leading_int(text, pos)
    if whole is None:
        return None
    fraction, scale, end = 0, 1.0, after_whole
    if end < len(text) and text[end] == ".":
        fraction, scale, end = _leading_fraction(text, end + 1)
    if after_whole == pos and end <= after_whole + 1:  # no digit before or after the dot
        return None
    unit_end = end
    while unit_end < len(text) and text[unit_end] != "." and not _is_digit(text[unit_end]):
        unit_end += 1
    unit = _UNIT_NANOSECONDS.get(text[end:unit_end])
    if unit is None or whole > _LIMIT // unit:
        return None
    value = whole * unit + int(fraction * (unit / scale))
    return (value, unit_end) if value <= _LIMIT else None


def _is_digit(char: str) -> bool:
    """ASCII only: ``str.isdigit`` would accept "\\u0661" (Arabic-Indic one), which Go does not."""
    return "0" <= char <= "9"


def _leading_int(text: str, pos: int) -> tuple[int | None, int]:
    """Go's ``leadingInt``: the digits at ``pos``; None once the value passes 2**63."""
    value = 0
    while pos < len(text) and _is_digit(text[pos]):
        value = value * 10 + ord(text[pos]) - ord("0")
        if value > _LIMIT:
            return None, pos
        pos += 1
    return value, pos


def _leading_fraction(text: str, pos: int) -> tuple[int, float, int]:
    """Go's ``leadingFraction``: (digits as an integer, 10**count, end); digits past int64 precision
    are skipped, not added, exactly as Go does."""
    value, scale, overflow = 0, 1.0, False
    while pos < len(text) and _is_digit(text[pos]):
        if not overflow:
            candidate = value * 10 + ord(text[pos]) - ord("0")
            overflow = value > (_LIMIT - 1) // 10 or candidate > _LIMIT
            if not overflow:
                value, scale = candidate, scale * 10
        pos += 1
    return value, scale, pos
