"""Property-based fuzzing of the two parsers that read what users write: pod specs and annotations.

Both run inside the informer's transform on every workload event, so an exception there leaves the
workload's previous snapshot in force, and a slow input stalls the single event loop for every
namespace. The properties: no input raises, each example finishes within the deadline, the result
depends on the input only (not on dict identity or call order), and nothing is invented (every
reference names a config the spec names; every problem names an annotation that is present).

Examples are derandomized so CI is reproducible, and kept few (CI has two cores).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reloader.annotations import DEFAULT_NAMES, MAX_LIST_ITEMS, parse_policy
from reloader.model import CONFIG_KINDS
from reloader.references import find_references

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""The deadline is per example and generous for a 2-core CI; a pathological input takes seconds."""

NAMES = st.text(
    alphabet=st.sampled_from("abcz09.-_/\\*+?()[]{}|^$ \u00e9\U0001f600\x00"), max_size=20
)
"""Names with regex metacharacters, spaces, NUL, non-ASCII: none of them valid, all possible."""
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | NAMES
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=4),
    max_leaves=30,
)
"""Any JSON-like value: what a field of the wrong type can hold."""


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually the right shape, sometimes anything at all."""
    return st.one_of(value, value, value, JSON)


def _key_ref(field: str) -> st.SearchStrategy[dict[str, Any]]:
    ref = st.fixed_dictionaries({"name": _maybe(NAMES)}, optional={"key": _maybe(NAMES)})
    return st.fixed_dictionaries({"valueFrom": _maybe(st.fixed_dictionaries({field: ref}))})


ENV = st.one_of(
    _key_ref("configMapKeyRef"),
    _key_ref("secretKeyRef"),
    st.fixed_dictionaries({"name": NAMES, "value": NAMES}),
    JSON,
)
ENV_FROM = st.one_of(
    st.fixed_dictionaries({"configMapRef": _maybe(st.fixed_dictionaries({"name": NAMES}))}),
    st.fixed_dictionaries({"secretRef": _maybe(st.fixed_dictionaries({"name": NAMES}))}),
    JSON,
)
ITEMS = _maybe(st.lists(_maybe(st.fixed_dictionaries({"key": NAMES, "path": NAMES})), max_size=3))
CONFIG_SOURCE = st.fixed_dictionaries({"name": _maybe(NAMES)}, optional={"items": ITEMS})
SECRET_SOURCE = st.fixed_dictionaries({"secretName": _maybe(NAMES)}, optional={"items": ITEMS})
PROJECTED = st.fixed_dictionaries(
    {
        "sources": _maybe(
            st.lists(
                st.one_of(
                    st.fixed_dictionaries({"configMap": _maybe(CONFIG_SOURCE)}),
                    st.fixed_dictionaries({"secret": _maybe(CONFIG_SOURCE)}),
                    JSON,
                ),
                max_size=3,
            )
        )
    }
)
VOLUME = st.one_of(
    st.fixed_dictionaries({"name": _maybe(NAMES), "configMap": _maybe(CONFIG_SOURCE)}),
    st.fixed_dictionaries({"name": _maybe(NAMES), "secret": _maybe(SECRET_SOURCE)}),
    st.fixed_dictionaries({"name": _maybe(NAMES), "projected": _maybe(PROJECTED)}),
    JSON,
)
CONTAINER = st.fixed_dictionaries(
    {},
    optional={
        "name": _maybe(NAMES),
        "env": _maybe(st.lists(ENV, max_size=4)),
        "envFrom": _maybe(st.lists(ENV_FROM, max_size=3)),
        "volumeMounts": _maybe(
            st.lists(_maybe(st.fixed_dictionaries({"name": _maybe(NAMES)})), max_size=3)
        ),
        "unknownField": JSON,
    },
)
POD_SPEC = st.fixed_dictionaries(
    {},
    optional={
        "containers": _maybe(st.lists(CONTAINER, max_size=4)),
        "initContainers": _maybe(st.lists(CONTAINER, max_size=2)),
        "volumes": _maybe(st.lists(VOLUME, max_size=4)),
        "ephemeralContainers": JSON,
    },
)
"""Pod specs shaped like real ones, with any field replaced by junk now and then."""


def _strings(value: object) -> Iterator[str]:
    """Every string anywhere in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


@FUZZ
@given(spec=st.one_of(POD_SPEC, POD_SPEC, POD_SPEC, JSON))
def test_find_references_never_raises_and_invents_nothing(spec: Any) -> None:
    pristine = copy.deepcopy(spec)
    found = find_references(spec)
    assert spec == pristine or spec != spec, "the spec was modified"  # NaN is never equal
    assert find_references(copy.deepcopy(spec)) == found
    present = set(_strings(spec))
    for ref in found:
        assert ref.kind in ("ConfigMap", "Secret")
        assert ref.name and ref.name in present
        assert ref.keys is None or (ref.keys and ref.keys <= present)
        assert set(ref.containers) <= present


_Place = Callable[[str], tuple[str, str, dict[str, Any]]]
_PLACES: tuple[_Place, ...] = (
    lambda n: ("Secret", "containers", {"name": "c", "envFrom": [{"secretRef": {"name": n}}]}),
    lambda n: ("ConfigMap", "containers", {"envFrom": [{"configMapRef": {"name": n}}]}),
    lambda n: ("Secret", "volumes", {"name": "v", "secret": {"secretName": n}}),
    lambda n: ("ConfigMap", "volumes", {"projected": {"sources": [{"configMap": {"name": n}}]}}),
)
"""(kind, pod-spec list, entry) that references one config by name, one way each."""


@FUZZ
@given(
    names=st.lists(NAMES.filter(bool), min_size=1, max_size=6, unique=True),
    spec=POD_SPEC,
)
def test_every_name_in_a_reference_field_is_found(names: list[str], spec: dict[str, Any]) -> None:
    """Junk elsewhere in the spec hides no well-formed reference: each is found, of its kind."""
    merged = copy.deepcopy(spec)
    expected = set()
    for i, name in enumerate(names):
        kind, field, entry = _PLACES[i % len(_PLACES)](name)
        current = merged.get(field)
        merged[field] = [*(current if isinstance(current, list) else []), entry]
        expected.add((kind, name))
    found = {(ref.kind, ref.name) for ref in find_references(merged)}
    assert expected <= found


ANNOTATION_KEYS = st.sampled_from(
    [
        DEFAULT_NAMES.auto,
        DEFAULT_NAMES.configmap_auto,
        DEFAULT_NAMES.secret_auto,
        DEFAULT_NAMES.configmap_reload,
        DEFAULT_NAMES.secret_reload,
        DEFAULT_NAMES.search,
        DEFAULT_NAMES.match,
        DEFAULT_NAMES.ignore,
        DEFAULT_NAMES.configmaps_exclude,
        DEFAULT_NAMES.secrets_exclude,
        DEFAULT_NAMES.pause_period,
        DEFAULT_NAMES.rollout_strategy,
        "example.com/other",
    ]
)
VALUES = st.one_of(
    st.sampled_from(["true", "false", "TRUE", "t", "1", "yes", "", " true", "restart", "rollout"]),
    st.text(alphabet=st.sampled_from("0123456789.hmsuµn-+ "), max_size=30),  # durations
    st.lists(NAMES, max_size=MAX_LIST_ITEMS + 2).map(",".join),  # named lists, regexes
    st.text(max_size=200),
)
ANNOTATIONS = st.dictionaries(ANNOTATION_KEYS, VALUES, max_size=8)
MALFORMED = st.one_of(ANNOTATIONS, st.none(), JSON, st.dictionaries(SCALARS, JSON, max_size=3))


@FUZZ
@given(meta=MALFORMED, template=MALFORMED, auto_reload_all=st.booleans())
def test_parse_policy_never_raises_and_reports_only_what_is_there(
    meta: Any, template: Any, auto_reload_all: bool
) -> None:
    policy, problems = parse_policy(
        meta, template, names=DEFAULT_NAMES, auto_reload_all=auto_reload_all
    )
    again = parse_policy(
        copy.deepcopy(meta),
        copy.deepcopy(template),
        names=DEFAULT_NAMES,
        auto_reload_all=auto_reload_all,
    )
    assert again == (policy, problems)
    assert hash(policy) == hash(again[0])
    keys = {k for source in (meta, template) if isinstance(source, dict) for k in source}
    for problem in problems:
        assert problem.annotation in keys
        assert len(problem.value) <= 80
    assert list(problems) == sorted(problems, key=lambda p: (p.annotation, p.value, p.reason))


@FUZZ
@given(meta=ANNOTATIONS, template=ANNOTATIONS, name=NAMES, referenced=st.booleans())
def test_policy_decisions_never_raise_on_any_config_name(
    meta: dict[str, str], template: dict[str, str], name: str, referenced: bool
) -> None:
    """A config name full of regex metacharacters is matched, never compiled or raised on."""
    policy, _ = parse_policy(meta, template, names=DEFAULT_NAMES, auto_reload_all=False)
    for kind in CONFIG_KINDS:
        decision = policy.wants(kind, name, referenced=referenced, match=True)
        assert decision == policy.wants(kind, name, referenced=referenced, match=True)
        if name in policy.rules(kind).excluded:
            assert not decision
